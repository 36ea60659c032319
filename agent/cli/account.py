"""``callgate account …``: suspend and resume an account in the ledger, with the operator.

A suspension in the ledger refuses the account's calls on every agent
(reason ``suspended``) until someone resumes it; the policy's
``status: suspended`` is separate (reason ``account_suspended``). Suspensions
come from here or from the policy's ``complaints: {suspend_after, period}``.
Every suspend and resume is kept with who did it, when and why.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli.common import OpenedLedger, now, operator_name, print_json
from agent.cli.complaint import command_group, policy_account
from agent.cli.notify import publish_event
from agent.compliance import actions


def register(sub: Any) -> None:
    command = command_group(sub, "account", "suspend or resume an account; its status")
    suspend = command("suspend", "refuse the account's calls on every agent", _suspend)
    suspend.add_argument("account")
    suspend.add_argument("--reason", required=True, help="why (one line, kept with it)")
    resume = command("resume", "lift a suspension", _resume)
    resume.add_argument("account")
    resume.add_argument("--note", default="", help="one line kept with it")
    command("status", "suspended or not, and the history", _status).add_argument("account")


async def _suspend(args: argparse.Namespace) -> int:
    who = operator_name(args)
    actions.not_blank(args.reason, "--reason")
    policy_account(args, args.account)
    async with OpenedLedger(args) as ledger:
        suspension, changed = await ledger.suspend(args.account, reason=args.reason,
                                                   operator=who, at=now())
    if changed:
        await publish_event(args, "account", {"action": "suspend", "account": args.account,
                                              "reason": args.reason, "operator": who})
    if args.json:
        print_json({"account": args.account, "suspended": True, "changed": changed,
                    "reason": suspension.reason, "operator": suspension.operator,
                    "at": suspension.at})
    elif changed:
        print(f"{args.account} suspended: its calls are refused on every agent")
    else:
        print(f"{args.account} was already suspended (since {suspension.at.isoformat()}, "
              f"{suspension.operator}: {suspension.reason})")
    return 0


async def _resume(args: argparse.Namespace) -> int:
    who = operator_name(args)
    policy_account(args, args.account)
    async with OpenedLedger(args) as ledger:
        changed = await ledger.resume(args.account, operator=who, at=now(), note=args.note)
    if changed:
        await publish_event(args, "account", {"action": "resume", "account": args.account,
                                              "note": args.note, "operator": who})
    if args.json:
        print_json({"account": args.account, "suspended": False, "changed": changed})
    elif changed:
        print(f"{args.account} resumed")
    else:
        print(f"{args.account} was not suspended; nothing changed")
    return 0


async def _status(args: argparse.Namespace) -> int:
    policy_account(args, args.account)
    async with OpenedLedger(args) as ledger:
        suspension = await ledger.suspension(args.account)
        events = await ledger.account_events(args.account)
    if args.json:
        print_json({"account": args.account, "suspended": suspension is not None,
                    "reason": suspension.reason if suspension else None,
                    "history": [{"action": e.action, "reason": e.reason,
                                 "operator": e.operator, "at": e.at} for e in events]})
        return 0
    state = "active" if suspension is None else f"suspended: {suspension.reason}"
    print(f"{args.account}: {state}")
    for e in events:
        print(f"  {e.at.isoformat()}  {e.action:<8} {e.operator}  {e.reason}")
    return 0
