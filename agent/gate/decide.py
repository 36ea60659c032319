"""``decide()``: may this call go out? Pure: everything it needs is an argument.

The same function serves the live gate (FastAGI / outbound socket / watch-only)
and ``callgate policy explain``. Rules are checked in a fixed order and the
first that fails gives the reason; with ``explain=True`` every rule looked at
is recorded in ``Decision.checks``. Inbound calls are never gated.

Order: account match → status → ledger suspension → caller-ID ownership →
number → scope → do-not-call (policy files) → live do-not-call (ledger) →
closed date → calling hours → concurrency → rate cap → frequency cap →
calls per second → caller-ID cap → ledger reachable → balance. Cheap, static rules come first;
rules that depend on the ledger come last, so a ledger outage still refuses
out-of-hours calls with the precise reason.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from agent.calls import CallInfo, Direction
from agent.gate.decision import AccountState, Check, Decision, Reason
from agent.gate.numbers import is_dialable
from agent.gate.policy import AccountPolicy, Policy
from agent.money import format_amount
from agent.rating import payable_seconds


def decide(
    policy: Policy,
    state: AccountState,
    request: CallInfo,
    now: datetime,
    *,
    explain: bool = False,
) -> Decision:
    checks: list[Check] = []

    # A detail is only read by `policy explain`: a rule whose detail has to be
    # built (f-strings, hours.describe()) passes it as a zero-argument callable,
    # called only when explaining, so the live gate does not pay for it.
    def check(rule: str, passed: bool, detail: str | Callable[[], str]) -> bool:
        if explain:
            checks.append(Check(rule, passed, detail if isinstance(detail, str) else detail()))
        return passed

    def deny(reason: Reason, message: str, account: AccountPolicy | None = None,
             destination: str = "") -> Decision:
        return Decision(False, reason, message, account.id if account else None,
                        destination=destination, checks=tuple(checks))

    if request.direction is Direction.INBOUND:
        check("direction", True, "inbound: never gated")
        return Decision(True, Reason.INBOUND, "inbound calls are not gated",
                        checks=tuple(checks))
    check("direction", True, "outbound")

    account = policy.match_account(request)
    if not check("account", account is not None,
                 lambda: f"matched {account.id!r}" if account else
                 f"no account for accountcode {request.accountcode!r}, endpoint "
                 f"{request.endpoint!r}, caller ID {request.caller_id!r}"):
        return deny(Reason.UNKNOWN_ACCOUNT,
                    f"no account matches accountcode {request.accountcode!r}")
    assert account is not None

    if not check("status", not account.suspended,
                 "suspended" if account.suspended else "active"):
        return deny(Reason.ACCOUNT_SUSPENDED, f"account {account.id} is suspended", account)
    if not check("ledger_account", not state.closed,
                 "closed by refund" if state.closed else "open"):
        return deny(Reason.ACCOUNT_CLOSED, f"account {account.id} was refunded and closed",
                    account)
    suspended = state.suspended
    if not check("suspension", suspended is None,
                 lambda: "not suspended" if suspended is None else f"suspended: {suspended}"):
        return deny(Reason.SUSPENDED, f"account {account.id} is suspended ({suspended})",
                    account)

    owned = account.owns_caller_id(request.caller_id)
    if not check("caller_id", owned, lambda: f"{request.caller_id!r} "
                 + ("is one of the account's numbers" if owned else "is not the account's")):
        return deny(Reason.CALLER_ID_NOT_OWNED,
                    f"caller ID {request.caller_id} is not registered to {account.id}", account)

    destination = account.normalize(request.destination)
    if not check("number", is_dialable(destination),
                 lambda: f"{request.destination!r} normalised to {destination!r}"):
        return deny(Reason.INVALID_NUMBER,
                    f"{request.destination!r} is not a dialable number", account, destination)

    hit = account.scope.longest(destination) if account.scope else None
    in_scope = hit[1] if hit is not None else not account.allow_list_only

    def scope_detail() -> str:
        if hit is not None:
            return f"longest prefix {hit[0]!r} is " + ("allowed" if hit[1] else "denied")
        return "no prefix rule matches" + (
            "; only allowed prefixes may be called" if account.allow_list_only else "")

    if not check("scope", in_scope, scope_detail):
        return deny(Reason.DESTINATION_NOT_ALLOWED,
                    f"{destination} is outside the allowed destinations", account, destination)

    listed = destination in account.dnc
    if not check("do_not_call", not listed,
                 lambda: f"{destination} {'is' if listed else 'is not'} on the do-not-call "
                 f"list ({len(account.dnc)} numbers)"):
        return deny(Reason.DO_NOT_CALL, f"{destination} is on a do-not-call list", account,
                    destination)
    live_dnc = state.live_dnc
    if live_dnc is not None:
        live = live_dnc.listed(account.id, destination)
        if not check("live_do_not_call", not live,
                     lambda: f"{destination} {'is' if live else 'is not'} on the ledger's "
                     f"live do-not-call list ({len(live_dnc)} entries)"):
            return deny(Reason.DO_NOT_CALL,
                        f"{destination} is on the live do-not-call list", account, destination)

    hours = account.hours
    closed = hours.is_closed_date(now)
    if not check("closed_date", not closed,
                 lambda: f"{hours.local(now).date()} is "
                 f"{'a closed date' if closed else 'open'}"):
        return deny(Reason.CLOSED_DATE,
                    f"outbound calling is closed on {hours.local(now).date()}", account,
                    destination)
    window = hours.window_at(now)
    if not check("calling_hours", window is not None, lambda: hours.describe(now)):
        return deny(Reason.OUTSIDE_HOURS,
                    f"outside calling hours ({hours.describe(now)})", account, destination)

    limit = account.max_concurrent_calls
    if not check("concurrency", limit is None or state.live_calls < limit,
                 lambda: f"{state.live_calls} live of "
                 f"{limit if limit is not None else 'unlimited'}"):
        return deny(Reason.CONCURRENCY_LIMIT,
                    f"all {limit} lines of {account.id} are in use", account, destination)

    if account.rate_cap is not None:
        used = state.account_attempts
        rate_cap = account.rate_cap
        if not check("rate_cap", used < rate_cap.max_attempts,
                     lambda: f"{used} attempts, {rate_cap.describe()}"):
            return deny(Reason.RATE_CAP,
                        f"{account.id} made {used} attempts ({account.rate_cap.describe()})",
                        account, destination)
    if account.callee_cap is not None:
        used = state.callee_attempts
        callee_cap = account.callee_cap
        if not check("frequency_cap", used < callee_cap.max_attempts,
                     lambda: f"{used} attempts to {destination}, {callee_cap.describe()}"):
            return deny(Reason.FREQUENCY_CAP,
                        f"{destination} was tried {used} times "
                        f"({account.callee_cap.describe()})", account, destination)

    cps = account.cps_limit
    if cps is not None:
        burst = state.cps_attempts
        if not check("cps_limit", burst < cps,
                     lambda: f"{burst} attempts in the last second, at most {cps}"):
            return deny(Reason.CPS_LIMIT,
                        f"{account.id} placed {burst} calls in the last second "
                        f"(at most {cps} per second)", account, destination)
    caller_cap = account.caller_id_cap
    if caller_cap is not None:
        hour, day = state.caller_hour_attempts, state.caller_day_attempts
        over_hour = caller_cap.per_hour is not None and hour >= caller_cap.per_hour
        over_day = caller_cap.per_day is not None and day >= caller_cap.per_day
        if not check("caller_id_cap", not (over_hour or over_day),
                     lambda: f"{request.caller_id}: {hour} attempts in the last hour, {day} "
                     f"today; {caller_cap.describe()}"):
            span = f"{hour} attempts in the last hour" if over_hour else f"{day} attempts today"
            return deny(Reason.CALLER_ID_CAP,
                        f"caller ID {request.caller_id} made {span} "
                        f"({caller_cap.describe()})", account, destination)

    tariff = account.tariff.for_destination(destination)
    window_left = hours.seconds_to_close(now) if account.at_window_end == "cut" else None

    if state.balance is None:
        fail_open = policy.prepaid.fail_mode == "open"
        check("ledger", fail_open, "ledger unreachable; fail mode "
              + policy.prepaid.fail_mode)
        if not fail_open:
            return deny(Reason.LEDGER_UNAVAILABLE,
                        "the ledger cannot be read and the policy fails closed", account,
                        destination)
        seconds = policy.prepaid.fail_open_max_seconds
        if window_left is not None:
            seconds = min(seconds, window_left)
        return Decision(True, Reason.LEDGER_UNAVAILABLE,
                        "ledger unreachable; allowed because the policy fails open",
                        account.id, tariff, seconds, destination, tuple(checks))

    paid = payable_seconds(tariff, state.balance)
    balance = state.balance
    if not check("balance", paid > 0,
                 lambda: f"available {format_amount(balance)}, first increment costs "
                 f"{format_amount(tariff.first_unit_cost)} ({tariff.name})"):
        return deny(Reason.INSUFFICIENT_BALANCE,
                    f"balance {format_amount(state.balance)} cannot pay "
                    f"{format_amount(tariff.first_unit_cost)} for the first "
                    f"{tariff.first_unit_seconds} s", account, destination)

    max_seconds = paid
    if window_left is not None:
        check("window_end", True,
              lambda: f"window closes in {window_left} s and the policy cuts")
        max_seconds = min(max_seconds, window_left)
    return Decision(True, Reason.ALLOWED, f"allowed for up to {max_seconds} s",
                    account.id, tariff, max_seconds, destination, tuple(checks))
