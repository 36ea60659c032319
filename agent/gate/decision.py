"""The gate's verdict types: the closed set of reasons, account state, Decision.

``decide()`` (in :mod:`agent.gate.decide`) builds a :class:`Decision` from a
policy, an :class:`AccountState`, a :class:`~agent.calls.CallInfo` request and
``now``. The reason codes below are a documented, closed set: dialplans,
dashboards and MQTT consumers match on them, so a code is never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from agent.calls import HangupCause
from agent.rating import Tariff


class Reason(StrEnum):
    """Why a call was allowed or refused (``CALLGATE_REASON`` / ``callgate_reason``)."""

    ALLOWED = "allowed"
    INBOUND = "inbound"
    EMERGENCY = "emergency"
    OUTSIDE_HOURS = "outside_hours"
    CLOSED_DATE = "closed_date"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    UNKNOWN_ACCOUNT = "unknown_account"
    ACCOUNT_SUSPENDED = "account_suspended"
    ACCOUNT_CLOSED = "account_closed"
    DESTINATION_NOT_ALLOWED = "destination_not_allowed"
    INVALID_NUMBER = "invalid_number"
    DO_NOT_CALL = "do_not_call"
    FREQUENCY_CAP = "frequency_cap"
    RATE_CAP = "rate_cap"
    SUSPENDED = "suspended"
    CPS_LIMIT = "cps_limit"
    CALLER_ID_CAP = "caller_id_cap"
    CALLER_ID_NOT_OWNED = "caller_id_not_owned"
    CONCURRENCY_LIMIT = "concurrency_limit"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"


REASON_HELP: dict[Reason, str] = {
    Reason.ALLOWED: "the call may go out",
    Reason.INBOUND: "inbound calls are never gated",
    Reason.EMERGENCY: "an emergency number: always allowed, never charged or counted",
    Reason.OUTSIDE_HOURS: "outside the account's calling hours, or too close to the close "
                          "for the shortest call (cut mode)",
    Reason.CLOSED_DATE: "outbound calling is closed on this date",
    Reason.INSUFFICIENT_BALANCE: "the balance cannot pay the first billing increment",
    Reason.UNKNOWN_ACCOUNT: "no account in the policy matches the call",
    Reason.ACCOUNT_SUSPENDED: "the account is suspended in the policy",
    Reason.ACCOUNT_CLOSED: "the account was refunded and closed in the ledger",
    Reason.DESTINATION_NOT_ALLOWED: "the destination is outside the allowed scope",
    Reason.INVALID_NUMBER: "the destination is not a dialable number (3-15 digits)",
    Reason.DO_NOT_CALL: "the destination is on a do-not-call list",
    Reason.FREQUENCY_CAP: "too many attempts to this number in the cap period",
    Reason.RATE_CAP: "too many attempts by this account in the rate period",
    Reason.SUSPENDED: "the account is suspended in the ledger (complaints, or by ops)",
    Reason.CPS_LIMIT: "the account placed its calls-per-second limit in the last second",
    Reason.CALLER_ID_CAP: "this caller ID placed its attempts for the hour or the day",
    Reason.CALLER_ID_NOT_OWNED: "the caller ID is not one of the account's own numbers",
    Reason.CONCURRENCY_LIMIT: "all the account's rented lines are busy",
    Reason.LEDGER_UNAVAILABLE: "the ledger could not be read in time (fail closed)",
    Reason.OVERLOADED: "the gate had more requests than it could decide within the budget, "
                       "counted from the PBX's connection; refused at once, ledger untouched "
                       "(fail closed)",
    Reason.SHUTTING_DOWN: "the agent is stopping and takes no new calls",
}

_DENY_CAUSE: dict[Reason, HangupCause] = {
    Reason.OUTSIDE_HOURS: HangupCause.OUTGOING_CALL_BARRED,
    Reason.CLOSED_DATE: HangupCause.OUTGOING_CALL_BARRED,
    Reason.DESTINATION_NOT_ALLOWED: HangupCause.OUTGOING_CALL_BARRED,
    Reason.DO_NOT_CALL: HangupCause.OUTGOING_CALL_BARRED,
    Reason.CALLER_ID_NOT_OWNED: HangupCause.OUTGOING_CALL_BARRED,
    Reason.SUSPENDED: HangupCause.OUTGOING_CALL_BARRED,
    Reason.CPS_LIMIT: HangupCause.NORMAL_TEMPORARY_FAILURE,
    Reason.CONCURRENCY_LIMIT: HangupCause.NORMAL_TEMPORARY_FAILURE,
    Reason.LEDGER_UNAVAILABLE: HangupCause.NORMAL_TEMPORARY_FAILURE,
    Reason.OVERLOADED: HangupCause.NORMAL_TEMPORARY_FAILURE,
    Reason.SHUTTING_DOWN: HangupCause.NORMAL_TEMPORARY_FAILURE,
}


class DncView(Protocol):
    """The live do-not-call entries (kept in memory by agent.compliance.live_dnc)."""

    def listed(self, account: str, number: str) -> bool:
        """On the account's own list, or on the list for everyone."""
        ...

    def __len__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class AccountState:
    """What the ledger knows of an account at decision time.

    ``balance`` is the *available* balance (postings minus open holds), or
    ``None`` when the ledger could not be read. Attempts count earlier
    *allowed* outbound attempts within the current period of each cap:
    ``callee_attempts`` to this destination within the callee cap's period,
    ``account_attempts`` to any number within the rate cap's period (see
    :meth:`~agent.gate.policy.Cap.since`; the gatekeeper asks the ledger for
    exactly those counts).

    The compliance rules read: ``suspended`` (why the ledger has the account
    suspended, or None), ``cps_attempts`` (allowed attempts in the last second),
    ``caller_hour_attempts`` / ``caller_day_attempts`` (allowed attempts from this
    caller ID in the last hour / since local midnight) and ``live_dnc`` (the
    in-memory copy of the ledger's do-not-call entries; None: none kept).
    """

    balance: Decimal | None
    live_calls: int = 0
    callee_attempts: int = 0
    account_attempts: int = 0
    closed: bool = False
    suspended: str | None = None
    cps_attempts: int = 0
    caller_hour_attempts: int = 0
    caller_day_attempts: int = 0
    live_dnc: DncView | None = None


@dataclass(frozen=True, slots=True)
class Check:
    """One rule the decision looked at, for ``policy explain``."""

    rule: str
    passed: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict. Three durations, three names (each None where it does not apply):

    - ``max_seconds``: the limit the PBX arms for this call *now* — the first paid
      billing unit (capped by the close under ``cut``; the gate adds the ring
      allowance). The meter extends it as the call pays on.
    - ``paid_seconds``: what the whole available balance pays for.
    - ``until_close``: seconds until the calling hours close (``cut`` only).
    """

    allow: bool
    reason: Reason
    message: str
    account: str | None = None
    tariff: Tariff | None = None
    max_seconds: int | None = None
    destination: str = ""
    checks: tuple[Check, ...] = ()
    paid_seconds: int | None = None
    until_close: int | None = None

    @property
    def result(self) -> str:
        """``ALLOW`` or ``DENY``, as the channel variables spell it."""
        return "ALLOW" if self.allow else "DENY"

    @property
    def hangup_cause(self) -> HangupCause:
        """The cause a refused call is hung up with."""
        return _DENY_CAUSE.get(self.reason, HangupCause.CALL_REJECTED)
