"""``callgate policy check|explain``: validate a policy; show what it decides for one call.

``explain`` reads the account's state from the ledger in the gate's own single
read (balance, live calls, and the attempts the rate and callee caps count over
their periods ending at ``--at``), so a cap refusal can be checked before a
policy ships. ``--balance``/``--live-calls`` override what the ledger says; when
the ledger cannot be read (none configured, unreachable) with ``--balance``
given, the caps are checked with 0 attempts and the output says so. A SQLite
ledger file that does not exist is never created by ``explain``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.calls import CallInfo, Direction
from agent.cli.common import (
    CheckFailed,
    UsageError,
    load_policy,
    now,
    policy_path,
    print_json,
)
from agent.days import parse_instant
from agent.gate.decide import decide
from agent.gate.decision import AccountState
from agent.money import AmountError, clip, format_amount, parse_amount
from agent.yamlfile import ConfigError

if TYPE_CHECKING:
    from agent.gate.policy import AccountPolicy


def register(sub: Any) -> None:
    policy = sub.add_parser("policy", help="check a policy or explain a decision")
    commands = policy.add_subparsers(dest="policy_command", required=True,
                                     parser_class=type(policy))

    check = commands.add_parser("check", help="validate a policy file")
    check.add_argument("path", nargs="?", help="policy file (default: the configured one)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_check)

    explain = commands.add_parser("explain", help="show the decision for one call")
    explain.add_argument("--account", required=True, help="account id (its accountcode)")
    explain.add_argument("--to", required=True, dest="destination", help="dialled number")
    explain.add_argument("--from", dest="caller_id",
                         help="caller ID (default: the account's first)")
    explain.add_argument("--at", help="ISO time (default: now); without a zone: the account's")
    explain.add_argument("--direction", choices=["outbound", "inbound"], default="outbound")
    explain.add_argument("--balance", help="available balance (default: the ledger's)")
    explain.add_argument("--live-calls", type=_count, default=None,
                         help=f"live calls of the account (0 to {MAX_LIVE_CALLS}; default: "
                              "the ledger's)")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=_explain)


MAX_LIVE_CALLS = 1_000_000  # far above any line count a customer rents


def _count(text: str) -> int:
    """``--live-calls``: a whole number of calls, 0 or more."""
    if not text.isascii() or not text.isdigit() or int(text) > MAX_LIVE_CALLS:
        raise UsageError(f"--live-calls {clip(text)!r} must be a whole number from 0 to "
                         f"{MAX_LIVE_CALLS}")
    return int(text)


async def _check(args: argparse.Namespace) -> int:
    from agent.gate.policy import load_policy as load

    try:
        path = Path(args.path) if args.path else policy_path(args)
    except UsageError as exc:
        # A bad agent.yaml is a failed check (exit 1), like a bad policy: ops run
        # `policy check` to know whether what they ship will load.
        if args.json:
            print_json({"valid": False, "errors": [{"file": None, "line": None, "path": "",
                                                    "message": str(exc)}]})
            return 1
        raise CheckFailed(f"callgate: {exc}") from None
    try:
        policy = load(path)
    except ConfigError as exc:
        if args.json:
            print_json({"valid": False, "errors": [
                {"file": e.file, "line": e.line, "path": e.path, "message": e.message}
                for e in exc.errors]})
            return 1
        raise CheckFailed(str(exc)) from None
    if args.json:
        print_json({"valid": True, "file": path, "accounts": sorted(policy.accounts)})
    else:
        print(policy.summary())
    return 0


class _Listed:
    """The live do-not-call entries that name the explained number (a DncView)."""

    def __init__(self, accounts: set[str], total: int) -> None:
        self.accounts, self.total = accounts, total

    def listed(self, account: str, number: str) -> bool:
        return account in self.accounts or "" in self.accounts

    def __len__(self) -> int:
        return self.total


@dataclass(frozen=True)
class _Read:
    """What ``explain`` got from the ledger (``state`` None: not read, ``why`` says)."""

    state: AccountState | None
    why: str = ""


async def _ledger_state(args: argparse.Namespace, account: AccountPolicy, request: CallInfo,
                        at: datetime) -> _Read:
    """The account's state as the gate would read it: one read, the same counts."""
    from agent.cli.common import open_store
    from agent.gatekeeper import state_request
    from agent.ledger import LedgerError

    try:
        ledger = await open_store(args)  # an existing ledger only: never created here
    except UsageError as exc:
        return _Read(None, str(exc))
    try:
        s = await ledger.account_state(account.id, **state_request(account, request, at))
        entries = await ledger.dnc_lookup(account.id, account.normalize(request.destination))
    except LedgerError as exc:
        return _Read(None, f"cannot read the ledger: {exc}")
    finally:
        await ledger.close()
    live_dnc = _Listed({e.account for e in entries}, len(entries))
    return _Read(AccountState(s.available, s.live_calls, s.callee_attempts, s.account_attempts,
                              s.closed, s.suspended, s.cps_attempts, s.caller_hour_attempts,
                              s.caller_day_attempts, live_dnc))


async def _explain(args: argparse.Namespace) -> int:
    policy = load_policy(args)
    account = policy.accounts.get(args.account)
    if account is None:
        known = ", ".join(sorted(policy.accounts)) or "none"
        raise UsageError(f"unknown account {args.account!r} (accounts: {known})")
    at = now() if args.at is None else parse_instant(args.at, account.hours.timezone, "--at")
    if args.caller_id is not None and not args.caller_id.strip():
        raise UsageError("--from must not be blank: the presented caller ID (leave it out "
                         "for the account's first number)")
    caller = args.caller_id or next(iter(sorted(account.caller_ids)), "")
    request = CallInfo(
        call_id="explain", direction=Direction(args.direction), caller_id=caller,
        destination=args.destination, accountcode=args.account,
    )
    read = await _ledger_state(args, account, request, at)
    if args.balance is not None:
        try:
            balance: Decimal | None = parse_amount(args.balance, allow_zero=True,
                                                   allow_negative=True)
        except AmountError as exc:
            raise UsageError(f"--balance: {exc}") from None
        state = AccountState(balance=balance) if read.state is None else \
            replace(read.state, balance=balance)
    elif read.state is None:
        raise UsageError(f"cannot read the balance from the ledger (or give --balance): "
                         f"{read.why}")
    else:
        state = read.state
        balance = state.balance
    if args.live_calls is not None:
        state = replace(state, live_calls=args.live_calls)
    decision = decide(policy, state, request, at, explain=True)
    if read.state is not None:
        attempts_note = (f"attempts from the ledger: {state.account_attempts} by the account, "
                         f"{state.callee_attempts} to this number (in the caps' periods)")
    else:
        attempts_note = f"attempts not read ({read.why}): the caps were checked with 0"
    if args.json:
        tariff = decision.tariff
        print_json({
            "allow": decision.allow,
            "result": decision.result,
            "reason": decision.reason.value,
            "message": decision.message,
            "max_seconds": decision.max_seconds,
            "paid_seconds": decision.paid_seconds,
            "until_close": decision.until_close,
            "attempts": {"read": read.state is not None, "account": state.account_attempts,
                         "callee": state.callee_attempts, "note": attempts_note},
            "tariff": None if tariff is None else {
                "name": tariff.name, "rate": tariff.rate, "increment": tariff.increment,
                "minimum": tariff.minimum, "rounding": tariff.rounding.value},
            "account": decision.account,
            "destination": decision.destination,
            "at": at,
            "balance": balance,
            "checks": [{"rule": c.rule, "passed": c.passed, "detail": c.detail}
                       for c in decision.checks],
        })
        return 0
    print(f"{decision.result}  reason={decision.reason.value}  {decision.message}")
    for c in decision.checks:
        print(f"  {'ok  ' if c.passed else 'FAIL'}  {c.rule:<14} {c.detail}")
    if decision.tariff is not None:
        t = decision.tariff
        print(f"  tariff {t.name}: {format_amount(t.rate)} CNY per {t.increment} s, "
              f"minimum {t.minimum} s, rounding {t.rounding.value}")
    def show(value: int | None) -> str:
        return "-" if value is None else f"{value} s"

    print(f"  max_seconds  {show(decision.max_seconds)}  (the limit armed now: the first "
          "paid unit, capped by the close)")
    print(f"  paid_seconds {show(decision.paid_seconds)}  (what the whole balance pays for)")
    print(f"  until_close  {show(decision.until_close)}  (to the close; cut mode only)")
    print(f"  {attempts_note}")
    return 0
