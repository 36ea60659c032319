"""``callgate complaint …``: record, list, show and withdraw complaints.

``add`` records the complaint, posts the policy's ``prepaid.complaint_penalty``
once per ticket, puts the callee on the account's live do-not-call list (in
force on every node within a second), suspends the account when the policy's
``complaints: {suspend_after, period}`` is reached, and publishes ``complaint``
on MQTT. The same ticket again is a replay (nothing written); with other
content it is refused (exit 2); without ``--at`` the complaint is dated when
recorded and running the same command again is a replay too. A closed
(refunded) account takes no complaint and no withdrawal. Notes are one line.
``withdraw`` reverses the fine with a posting;
the do-not-call entry and any suspension stay until ops remove them
(``callgate dnc remove``, ``callgate account resume``).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from datetime import UTC, timedelta
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
from agent.compliance import actions
from agent.compliance.actions import checked, complaint_json
from agent.days import day_start, parse_period
from agent.gate.policy import Policy
from agent.ledger.compliance import typed_ticket
from agent.money import CURRENCY, format_amount

Command = Callable[[argparse.Namespace], Awaitable[int]]


def command_group(sub: Any, name: str, text: str
                  ) -> Callable[[str, str, Command], argparse.ArgumentParser]:
    """``callgate NAME …``; returns the maker of its subcommands, each with ``--json``
    (the compliance commands' shared shape: complaint, dnc, account)."""
    group = sub.add_parser(name, help=text)
    commands = group.add_subparsers(dest=f"{name}_command", required=True,
                                    parser_class=type(group))

    def command(verb: str, what: str, func: Command) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(verb, help=what)
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(func=func)
        return parser

    return command


def register(sub: Any) -> None:
    command = command_group(sub, "complaint", "complaints: record (fine, DNC), list, withdraw")
    add = command("add", "record a complaint: fine once per ticket, DNC", _add)
    add.add_argument("--account", required=True)
    add.add_argument("--callee", required=True, help="the number that complained")
    add.add_argument("--ticket", required=True, help="the complaint's ticket (12321 number)")
    add.add_argument("--at", help="when (ISO time, the account's timezone; default now)")
    add.add_argument("--note", default="", help="one line kept with the complaint")

    listing = command("list", "complaints of a period or an account", _list)
    listing.add_argument("--account")
    listing.add_argument("--from", dest="start", help="first day, YYYY-MM-DD")
    listing.add_argument("--to", dest="end", help="last day, YYYY-MM-DD (included)")

    command("show", "one complaint", _show).add_argument("ticket")

    withdraw = command("withdraw", "withdraw: the fine is reversed by a posting", _withdraw)
    withdraw.add_argument("ticket")
    withdraw.add_argument("--note", default="", help="one line kept with the withdrawal")


def policy_account(args: argparse.Namespace, account: str) -> tuple[Policy, ZoneInfo]:
    """The loaded policy and the account's timezone; an account it lacks is refused
    (compliance commands act on accounts the gate knows)."""
    policy = load_policy(args)
    return policy, actions.policy_account(policy, account)


async def _add(args: argparse.Namespace) -> int:
    who = operator_name(args)
    req = actions.complaint(load_policy(args), args.account, args.callee, args.ticket, args.at,
                            args.note, now())
    async with OpenedLedger(args) as ledger:
        outcome = await ledger.add_complaint(
            account=req.account, callee=req.callee, ticket=req.ticket, at=req.at, fine=req.fine,
            operator=who, note=req.note, recorded_at=now(), suspend=req.suspend)
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
        state = f"; {c.account} is suspended" if outcome.suspended else ""
        print(f"complaint {c.ticket} was already recorded; nothing new written{state}")
        return 0
    fined = (f"fined {format_amount(c.fine)} {CURRENCY}" if c.fine else "no fine (policy: 0)")
    print(f"complaint {c.ticket}: {c.account}, callee {c.callee}, {fined}; "
          f"{c.callee} is on {c.account}'s do-not-call list")
    if outcome.newly_suspended:
        print(f"  {c.account} is now suspended: {outcome.complaints_in_period} complaints "
              "in the policy's period (callgate account resume to lift)")
    return 0


async def _list(args: argparse.Namespace) -> int:
    zone: ZoneInfo | Any = UTC
    if args.account is not None:  # --account "" is an unknown account, not "every account"
        _, zone = policy_account(args, args.account)
    else:
        load_policy(args)  # the same checks as every command: a usable policy
    first, last = parse_period(args.start, args.end)
    start = day_start(first, zone) if first else None
    end = day_start(last + timedelta(days=1), zone) if last else None
    if start and end and end <= start:
        raise UsageError("--to is before --from")
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
    print(_table(["TICKET", "ACCOUNT", "CALLEE", f"AT ({zone})", "FINE", "STATUS", "OPERATOR"],
                 rows, {4}))
    return 0


async def _show(args: argparse.Namespace) -> int:
    ticket = checked("ticket", typed_ticket, args.ticket)
    async with OpenedLedger(args) as ledger:
        c = await ledger.complaint(ticket)
    if c is None:
        raise UsageError(f"no complaint with ticket {ticket!r}")
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
    ticket = checked("ticket", typed_ticket, args.ticket)
    async with OpenedLedger(args) as ledger:
        c, changed = await ledger.withdraw_complaint(ticket, operator=who, at=now(),
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
