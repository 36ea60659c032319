"""``callgate dnc …``: live do-not-call entries in the ledger, per account or for everyone.

Unlike the policy's do-not-call files, these take effect on every agent
sharing the ledger within a second, without a policy reload (each agent keeps
an in-memory copy it refreshes from the ledger's change log). Numbers are
normalised with the account's number rules (``--all``: the defaults'). Adding
an entry that exists, or removing one that does not, writes nothing.
"""

from __future__ import annotations

import argparse
from datetime import UTC
from typing import Any

from agent.cli.common import (
    OpenedLedger,
    load_policy,
    now,
    operator_name,
    print_json,
)
from agent.cli.complaint import command_group, policy_account
from agent.cli.ledger import _local, _table
from agent.compliance import actions
from agent.compliance.actions import entry_json
from agent.ledger.compliance import GLOBAL


def register(sub: Any) -> None:
    command = command_group(sub, "dnc", "live do-not-call entries (in force within a second)")
    for name, text, func in (("add", "add a number", _add), ("remove", "remove a number",
                                                             _remove)):
        cmd = command(name, text, func)
        cmd.add_argument("number")
        _scope(cmd)
        cmd.add_argument("--reason", required=name == "add", default="",
                         help="why (one line, kept with the entry)")
    scope = command("list", "the live entries", _list).add_mutually_exclusive_group()
    scope.add_argument("--account")
    scope.add_argument("--all", action="store_true", help="only the entries for everyone")


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
    # Times in the account's zone; entries of many accounts (or for everyone) in UTC.
    zone: Any = UTC
    if args.account is not None:  # --account "" is an unknown account, not the global list
        _, zone = policy_account(args, args.account)
    else:
        load_policy(args)  # the same checks as every command: a usable policy
    scope = GLOBAL if args.all else args.account
    async with OpenedLedger(args) as ledger:
        entries = await ledger.dnc_list(scope)
    if args.json:
        print_json({"entries": [entry_json(e) for e in entries]})
        return 0
    if not entries:
        print("no live do-not-call entries")
        return 0
    rows = [[_who(e.account), e.number, _local(e.added_at, zone), e.operator, e.reason]
            for e in entries]
    print(_table(["FOR", "NUMBER", f"ADDED ({zone})", "OPERATOR", "REASON"], rows, set()))
    return 0
