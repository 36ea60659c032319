"""``decide()``: may this call go out? Pure: everything it needs is an argument.

The same function serves the live gate (FastAGI / outbound socket / watch-only)
and ``callgate policy explain``. Rules are checked in a fixed order and the
first that fails gives the reason; with ``explain=True`` every rule looked at
is recorded in ``Decision.checks``. Inbound calls are never gated.

Order: emergency number → account match → status → ledger suspension →
caller-ID ownership → number → scope → do-not-call (policy files) → live
do-not-call (ledger) → closed date → calling hours (with, under ``cut``, room
for the shortest call before the close) → concurrency → rate cap → frequency
cap → calls per second → caller-ID cap → ledger reachable → balance. An
emergency number is allowed before anything else is looked at. Cheap, static
rules come first; rules that depend on the ledger come last, so a ledger outage
still refuses out-of-hours calls with the precise reason. An allowed call
always has ``max_seconds`` > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from agent.calls import CallInfo, Direction
from agent.gate.decision import AccountState, Check, Decision, Reason
from agent.gate.policy import AccountPolicy, Policy
from agent.money import format_amount
from agent.rating import payable_seconds

# An emergency call is not limited by money; it still gets a (day-long) limit so that a
# dialplan which lets only a limited ALLOW through (both shipped ones do) connects it.
EMERGENCY_MAX_SECONDS = 86400


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
    emergency = policy.emergency_number(request, account)
    check("emergency", True, lambda: f"{request.destination!r} is "
          + ("an emergency number: allowed first" if emergency else "not an emergency number"))
    if emergency is not None:
        return Decision(True, Reason.EMERGENCY,
                        f"{emergency} is an emergency number: always allowed, never charged",
                        account.id if account else None, max_seconds=EMERGENCY_MAX_SECONDS,
                        destination=emergency or "", checks=tuple(checks))
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
    if not check("number", account.normalize.is_dialable(destination),
                 lambda: f"{request.destination!r} normalised to {destination!r}"):
        shown = request.destination if len(request.destination) <= 40 else \
            request.destination[:40] + "…"
        return deny(Reason.INVALID_NUMBER,
                    f"{shown!r} is not a dialable number (3-15 digits)", account, destination)

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
    period = hours.open_period(now)
    if not check("calling_hours", period is not None, lambda: hours.describe(now)):
        return deny(Reason.OUTSIDE_HOURS,
                    f"outside calling hours ({hours.describe(now)})", account, destination)
    assert period is not None
    tariff = account.tariff.for_destination(destination)
    until_close: int | None = None
    if account.at_window_end == "cut":
        # A call that cannot get its shortest useful slot before the close is refused
        # here, never allowed with nothing (or a fraction of its first increment) to talk.
        until_close = max(0, int((period[1] - now).total_seconds()))
        shortest = account.min_call_seconds or tariff.first_unit_seconds
        left = until_close
        if not check("window_end", left >= shortest,
                     lambda: f"the hours close in {left} s and the policy cuts; the shortest "
                     f"call is {shortest} s"):
            return deny(Reason.OUTSIDE_HOURS,
                        f"the calling hours close in {left} s, less than the shortest call "
                        f"({shortest} s)", account, destination)

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

    if state.balance is None:
        fail_open = policy.prepaid.fail_mode == "open"
        check("ledger", fail_open, "ledger unreachable; fail mode "
              + policy.prepaid.fail_mode)
        if not fail_open:
            return deny(Reason.LEDGER_UNAVAILABLE,
                        "the ledger cannot be read and the policy fails closed", account,
                        destination)
        seconds = policy.prepaid.fail_open_max_seconds
        if until_close is not None:
            seconds = min(seconds, until_close)
        return Decision(True, Reason.LEDGER_UNAVAILABLE,
                        f"ledger unreachable; allowed for {seconds} s because the policy "
                        "fails open", account.id, tariff, seconds, destination, tuple(checks),
                        until_close=until_close)

    paid = payable_seconds(tariff, state.balance)
    balance = state.balance
    if not check("balance", paid > 0,
                 lambda: f"available {format_amount(balance)}, first increment costs "
                 f"{format_amount(tariff.first_unit_cost)} ({tariff.name})"):
        return deny(Reason.INSUFFICIENT_BALANCE,
                    f"balance {format_amount(state.balance)} cannot pay "
                    f"{format_amount(tariff.first_unit_cost)} for the first "
                    f"{tariff.first_unit_seconds} s", account, destination)

    # The limit armed now is the first paid unit (the meter extends it as the call
    # pays on); what the whole balance pays for is paid_seconds.
    max_seconds = min(tariff.first_unit_seconds, paid)
    if until_close is not None:
        max_seconds = min(max_seconds, until_close)
    message = f"allowed: first unit {max_seconds} s, the balance pays {paid} s"
    if until_close is not None:
        message += f", the hours close in {until_close} s"
    return Decision(True, Reason.ALLOWED, message, account.id, tariff, max_seconds,
                    destination, tuple(checks), paid_seconds=paid, until_close=until_close)
