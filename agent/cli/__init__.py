"""The ``callgate`` command: argument parsing and dispatch to the command groups.

Exit status: 0 success, 1 a check failed (e.g. invalid policy), 2 bad usage or
refused input (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from agent import __version__, eventloop
from agent.cli.common import CheckFailed, UsageError
from agent.finance import Refused


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="callgate",
        description="Call gating and prepaid metering beside an Asterisk or FreeSWITCH PBX.",
    )
    parser.add_argument("-c", "--config", help="agent config (env CALLGATE_CONFIG)")
    parser.add_argument("--policy", help="policy YAML (env CALLGATE_POLICY)")
    parser.add_argument("--ledger", help="ledger URL (env CALLGATE_LEDGER)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    version = sub.add_parser("version", help="print the version")
    version.add_argument("--json", action="store_true")
    version.set_defaults(func=_version)

    from agent.cli import ledger, policy, runtime, web

    policy.register(sub)
    ledger.register(sub)
    runtime.register(sub)
    web.register(sub)
    return parser


async def _version(args: argparse.Namespace) -> int:
    if args.json:
        from agent.cli.common import print_json

        print_json({"version": __version__})
    else:
        print(f"callgate {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = eventloop.run(result)
        return int(result or 0)
    except (UsageError, Refused, eventloop.LoopChoiceError) as exc:
        print(f"callgate: error: {exc}", file=sys.stderr)
        return 2
    except CheckFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
