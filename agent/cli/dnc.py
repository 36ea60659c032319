"""``callgate dnc …``: live do-not-call entries in the ledger, per account or for everyone.

Unlike the policy's do-not-call files, these take effect on every agent
sharing the ledger within a second, without a policy reload (each agent keeps
an in-memory copy it refreshes from the ledger's change log). Numbers are
normalised with the account's number rules (``--all``: the defaults'). Adding
an entry that exists, or removing one that does not, writes nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli.common import (
    OpenedLedger,
    UsageError,
    load_policy,
    now,
    operator_name,
    print_json,
)
from agent.cli.ledger import _local, _table
from agent.compliance import actions
from agent.compliance.actions import entry_json
from agent.ledger.compliance import GLOBAL


def register(sub: Any) -> None:
    group = sub.add_parser("dnc", help="live do-not-call entries (in force within a second)")
    commands = group.add_subparsers(dest="dnc_command", required=True,
                                    parser_class=type(group))
    for name, text in (("add", "add a number"), ("remove", "remove a number")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("number")
        _scope(cmd)
        cmd.add_argument("--reason", required=name == "add", default="",
                         help="why (kept with the entry)")
        cmd.add_argument("--json", action="store_true")
        cmd.set_defaults(func=_add if name == "add" else _remove)
    listing = commands.add_parser("list", help="the live entries")
    scope = listing.add_mutually_exclusive_group()
    scope.add_argument("--account")
    scope.add_argument("--all", action="store_true", help="only the entries for everyone")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)


def _scope(cmd: argparse.ArgumentParser) -> None:
    scope = cmd.add_mutually_exclusive_group(required=True)
    scope.add_argument("--account", help="the account whose list it is")
    scope.add_argument("--all", action="store_true", help="for every account")


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(account or GLOBAL, normalised number), checked against the policy."""
    return actions.dnc_target(load_policy(args), None if args.all else args.account,
                              args.number)


def _who(account: str) -> str:
    return "everyone" if account == GLOBAL else account


async def _add(args: argparse.Namespace) -> int:
    who = operator_name(args)
    actions.not_blank(args.reason, "--reason")
    account, number = _target(args)
    async with OpenedLedger(args) as ledger:
        entry, added = await ledger.dnc_add(account, number, reason=args.reason,
                                            operator=who, at=now())
    if args.json:
        print_json({**entry_json(entry), "added": added})
    elif added:
        print(f"{number} is on the do-not-call list of {_who(account)} (all agents within "
              "a second)")
    else:
        print(f"{number} was already on the do-not-call list of {_who(account)} "
              f"(since {entry.added_at.isoformat()}, {entry.operator}: {entry.reason})")
    return 0


async def _remove(args: argparse.Namespace) -> int:
    who = operator_name(args)
    account, number = _target(args)
    async with OpenedLedger(args) as ledger:
        removed = await ledger.dnc_remove(account, number, operator=who, at=now(),
                                          reason=args.reason)
    if args.json:
        print_json({"account": account or None, "number": number, "removed": removed})
    elif removed:
        print(f"{number} removed from the do-not-call list of {_who(account)}")
    else:
        print(f"{number} was not on the do-not-call list of {_who(account)}; nothing changed")
    return 0


async def _list(args: argparse.Namespace) -> int:
    policy = load_policy(args)
    if args.account and args.account not in policy.accounts:
        raise UsageError(f"unknown account {args.account!r}")
    scope = GLOBAL if args.all else args.account
    async with OpenedLedger(args) as ledger:
        entries = await ledger.dnc_list(scope)
    if args.json:
        print_json({"entries": [entry_json(e) for e in entries]})
        return 0
    if not entries:
        print("no live do-not-call entries")
        return 0
    zone = next(iter(policy.accounts.values())).hours.timezone if policy.accounts else None
    rows = [[_who(e.account), e.number, _local(e.added_at, zone) if zone else
             e.added_at.isoformat(), e.operator, e.reason] for e in entries]
    print(_table(["FOR", "NUMBER", "ADDED", "OPERATOR", "REASON"], rows, set()))
    return 0
