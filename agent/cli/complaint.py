"""``callgate complaint …``: record, list, show and withdraw complaints.

``add`` records the complaint, posts the policy's ``prepaid.complaint_penalty``
once per ticket, puts the callee on the account's live do-not-call list (in
force on every node within a second), suspends the account when the policy's
``complaints: {suspend_after, period}`` is reached, and publishes ``complaint``
on MQTT. The same ticket again is a replay (nothing written); with other
content it is refused (exit 2). ``withdraw`` reverses the fine with a posting;
the do-not-call entry and any suspension stay until ops remove them
(``callgate dnc remove``, ``callgate account resume``).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from agent.cli.common import (
    OpenedLedger,
    UsageError,
    load_policy,
    now,
    operator_name,
    print_json,
)
from agent.cli.ledger import _local, _table
from agent.cli.notify import publish_event
from agent.days import day_start, parse_instant, parse_period
from agent.gate.dnc import MAX_DIGITS
from agent.gate.policy import Policy
from agent.ledger.compliance import Complaint
from agent.money import CURRENCY, clip, format_amount


def register(sub: Any) -> None:
    group = sub.add_parser("complaint", help="complaints: record (fine, DNC), list, withdraw")
    commands = group.add_subparsers(dest="complaint_command", required=True,
                                    parser_class=type(group))

    add = commands.add_parser("add", help="record a complaint: fine once per ticket, DNC")
    add.add_argument("--account", required=True)
    add.add_argument("--callee", required=True, help="the number that complained")
    add.add_argument("--ticket", required=True, help="the complaint's ticket (12321 number)")
    add.add_argument("--at", help="when (ISO time, the account's timezone; default now)")
    add.add_argument("--note", default="")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=_add)

    listing = commands.add_parser("list", help="complaints of a period or an account")
    listing.add_argument("--account")
    listing.add_argument("--from", dest="start", help="first day, YYYY-MM-DD")
    listing.add_argument("--to", dest="end", help="last day, YYYY-MM-DD (included)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)

    show = commands.add_parser("show", help="one complaint")
    show.add_argument("ticket")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    withdraw = commands.add_parser("withdraw", help="withdraw: the fine is reversed by a posting")
    withdraw.add_argument("ticket")
    withdraw.add_argument("--note", default="")
    withdraw.add_argument("--json", action="store_true")
    withdraw.set_defaults(func=_withdraw)


def policy_account(args: argparse.Namespace, account: str) -> tuple[Policy, ZoneInfo]:
    """The loaded policy and the account's timezone; an account it lacks is refused
    (compliance commands act on accounts the gate knows)."""
    policy = load_policy(args)
    entry = policy.accounts.get(account)
    if entry is None:
        known = ", ".join(sorted(policy.accounts)) or "none"
        raise UsageError(f"unknown account {clip(account)!r} (the policy has: {clip(known)})")
    return policy, entry.hours.timezone


def complaint_json(c: Complaint) -> dict[str, Any]:
    return {"ticket": c.ticket, "account": c.account, "callee": c.callee, "at": c.at,
            "fine": c.fine, "operator": c.operator, "note": c.note,
            "recorded_at": c.recorded_at, "withdrawn": c.withdrawn,
            "withdrawn_at": c.withdrawn_at, "withdrawn_by": c.withdrawn_by,
            "withdraw_note": c.withdraw_note}


def _at(text: str | None, zone: ZoneInfo) -> datetime:
    if text is None:
        return now()
    at = parse_instant(text, zone, "--at")
    if at > now() + timedelta(minutes=5):
        raise UsageError(f"--at {text} is in the future")
    return at


async def _add(args: argparse.Namespace) -> int:
    who = operator_name(args)
    if not args.ticket.strip():
        raise UsageError("--ticket must not be blank")
    policy, zone = policy_account(args, args.account)
    callee = policy.accounts[args.account].normalize(args.callee)
    if not callee.isdigit() or len(callee) > MAX_DIGITS:
        raise UsageError(f"--callee {args.callee!r} is not a phone number")
    at = _at(args.at, zone)
    fine = policy.prepaid.complaint_penalty
    async with OpenedLedger(args) as ledger:
        outcome = await ledger.add_complaint(
            account=args.account, callee=callee, ticket=args.ticket.strip(), at=at, fine=fine,
            operator=who, note=args.note, recorded_at=now(), suspend=policy.complaints)
    c = outcome.complaint
    if outcome.created:
        await publish_event(args, "complaint", {
            "action": "added", **complaint_json(c),
            "complaints_in_period": outcome.complaints_in_period,
            "suspended": outcome.suspended})
    if args.json:
        print_json({**complaint_json(c), "created": outcome.created,
                    "complaints_in_period": outcome.complaints_in_period,
                    "suspended": outcome.suspended})
        return 0
    if not outcome.created:
        print(f"complaint {c.ticket} was already recorded; nothing new written")
        return 0
    fined = (f"fined {format_amount(c.fine)} {CURRENCY}" if c.fine else "no fine (policy: 0)")
    print(f"complaint {c.ticket}: {c.account}, callee {c.callee}, {fined}; "
          f"{c.callee} is on {c.account}'s do-not-call list")
    if outcome.suspended:
        print(f"  {c.account} is now suspended: {outcome.complaints_in_period} complaints "
              "in the policy's period (callgate account resume to lift)")
    return 0


async def _list(args: argparse.Namespace) -> int:
    zone: ZoneInfo | Any = UTC
    if args.account:
        _, zone = policy_account(args, args.account)
    else:
        load_policy(args)  # the same checks as every command: a usable policy
    first, last = parse_period(args.start, args.end)
    start = day_start(first, zone) if first else None
    end = day_start(last + timedelta(days=1), zone) if last else None
    async with OpenedLedger(args) as ledger:
        found = await ledger.complaints(args.account, start, end)
    if args.json:
        print_json({"complaints": [complaint_json(c) for c in found]})
        return 0
    if not found:
        print("no complaints")
        return 0
    rows = [[c.ticket, c.account, c.callee, _local(c.at, zone), format_amount(c.fine),
             "withdrawn" if c.withdrawn else "standing", c.operator] for c in found]
    print(_table(["TICKET", "ACCOUNT", "CALLEE", "AT", "FINE", "STATUS", "OPERATOR"], rows,
                 {4}))
    return 0


async def _show(args: argparse.Namespace) -> int:
    async with OpenedLedger(args) as ledger:
        c = await ledger.complaint(args.ticket)
    if c is None:
        raise UsageError(f"no complaint with ticket {args.ticket!r}")
    if args.json:
        print_json(complaint_json(c))
        return 0
    print(f"complaint {c.ticket}")
    print(f"  account   {c.account}\n  callee    {c.callee}\n  at        {c.at.isoformat()}")
    print(f"  fine      {format_amount(c.fine)} {CURRENCY}\n  recorded  "
          f"{c.recorded_at.isoformat()} by {c.operator}")
    if c.note:
        print(f"  note      {c.note}")
    if c.withdrawn_at is not None:
        print(f"  withdrawn {c.withdrawn_at.isoformat()} by {c.withdrawn_by}"
              + (f": {c.withdraw_note}" if c.withdraw_note else ""))
    return 0


async def _withdraw(args: argparse.Namespace) -> int:
    who = operator_name(args)
    async with OpenedLedger(args) as ledger:
        c, changed = await ledger.withdraw_complaint(args.ticket, operator=who, at=now(),
                                                     note=args.note)
    if changed:
        await publish_event(args, "complaint", {"action": "withdrawn", **complaint_json(c)})
    if args.json:
        print_json({**complaint_json(c), "changed": changed})
        return 0
    if not changed:
        print(f"complaint {c.ticket} was already withdrawn; nothing new written")
        return 0
    print(f"complaint {c.ticket} withdrawn: {format_amount(c.fine)} {CURRENCY} credited back "
          f"to {c.account}; {c.callee} stays on its do-not-call list")
    return 0
