"""``callgate config check``: the whole configuration checked as ``run`` would check it.

``policy check`` validates a policy file; ops shipping a change need more: the
agent config (``agent.yaml``) itself, and everything ``run`` verifies before it
takes a call — the policy it names, the PBX secret, the listen addresses, the
MQTT settings and the ledger (reachable; a store that does not exist yet is
noted, since ``run`` creates it). Both commands share :func:`agent.daemon.preflight`
with ``run``, so a config that passes here does not fail there for a reason
either could have seen. ``--policy``/``--ledger`` (or ``CALLGATE_POLICY``/
``CALLGATE_LEDGER``) replace the config's ``policy:``/``ledger:`` here as in
``run``, with a note saying so. Exit 0 valid, 1 not (one line per problem).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import DEFAULT_CONFIG, CheckFailed, overridden, print_json
from agent.money import clip


def register(sub: Any) -> None:
    config = sub.add_parser("config", help="check the agent config and the policy it names")
    commands = config.add_subparsers(dest="config_command", required=True,
                                     parser_class=type(config))
    check = commands.add_parser(
        "check", help="check agent.yaml and everything run checks before it starts")
    check.add_argument("path", nargs="?", help="agent config (default: -c, CALLGATE_CONFIG, "
                                               f"or {DEFAULT_CONFIG})")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_check)


async def _check(args: argparse.Namespace) -> int:
    import os

    from agent.config import load_agent_config
    from agent.daemon import StartupError, preflight
    from agent.ledger import LedgerError, open_ledger
    from agent.yamlfile import ConfigError

    named = args.path or args.config or os.environ.get("CALLGATE_CONFIG")
    path = Path(named) if named else DEFAULT_CONFIG
    problems: list[str] = []
    notes: list[str] = []
    summary = ""
    config = None
    if not path.is_file():
        problems.append(f"{path}: the agent config does not exist (or is not a file)")
    else:
        try:
            config = load_agent_config(path)
        except ConfigError as exc:
            problems.extend(str(e) for e in exc.errors)
    if config is not None:
        notes.extend(overridden(config, args))  # --policy/--ledger, as run takes them
        try:
            policy = preflight(config, notes)
            summary = policy.summary()
        except StartupError as exc:
            problems.extend(line for line in str(exc).splitlines() if line.strip())
        try:
            ledger = await open_ledger(config.ledger, create=False)
        except LedgerError as exc:
            text = clip(str(exc), 400)
            if text.startswith("no ledger at"):
                where = text[len("no ledger at "):].split(": ", 1)[0]
                notes.append(f"ledger: none yet at {where}; `callgate run` "
                             "(or `callgate ledger init`) creates it")
            else:
                problems.append(f"ledger: {text}")
        else:
            await ledger.close()
    if args.json:
        print_json({"valid": not problems, "file": path, "problems": problems,
                    "notes": notes})
        return 1 if problems else 0
    if problems:
        raise CheckFailed("\n".join(clip(p, 400) for p in problems))
    print(f"agent config {path} is valid")
    if summary:
        print(summary)
    for note in notes:
        print(note)
    return 0
