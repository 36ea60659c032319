"""The ``callgate`` command: argument parsing and dispatch to the command groups.

Exit status: 0 success, 1 a check failed (e.g. invalid policy), 2 bad usage or
refused input (one line on stderr, nothing written). No traceback reaches a
user: an output pipe closed early (``… | head``) ends the command quietly, and
an unexpected error is one line (``CALLGATE_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from agent import __version__, eventloop
from agent.cli.common import CheckFailed, UsageError
from agent.days import DayError
from agent.finance import Refused


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _not_blank(option: str) -> Callable[[str], str]:
    """A path or URL option given blank (``--ledger "$UNSET"``) is refused, not read as
    "not given" (which would silently fall back to the environment or agent.yaml)."""
    def check(text: str) -> str:
        if not text.strip():
            raise UsageError(f"{option} must not be blank")
        return text

    return check


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="callgate",
        description="Call gating and prepaid metering beside an Asterisk or FreeSWITCH PBX.",
    )
    parser.add_argument("-c", "--config", type=_not_blank("--config"),
                        help="agent config (env CALLGATE_CONFIG)")
    parser.add_argument("--policy", type=_not_blank("--policy"),
                        help="policy YAML (env CALLGATE_POLICY)")
    parser.add_argument("--ledger", type=_not_blank("--ledger"),
                        help="ledger URL (env CALLGATE_LEDGER)")
    parser.add_argument("--operator", metavar="NAME",
                        help="who is doing this, recorded with every posting "
                             "(default: your login name)")
    parser.add_argument("--version", action="version", version=f"callgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    version = sub.add_parser("version", help="print the version")
    version.add_argument("--json", action="store_true")
    version.set_defaults(func=_version)

    from agent.cli import account, complaint, config, dnc, ledger, policy, runtime, status, web

    config.register(sub)
    policy.register(sub)
    ledger.register(sub)
    runtime.register(sub)
    status.register(sub)
    web.register(sub)
    complaint.register(sub)
    dnc.register(sub)
    account.register(sub)
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
        try:
            args = parser.parse_args(argv)
            result = args.func(args)
            if asyncio.iscoroutine(result):
                result = eventloop.run(result)
            code = int(result or 0)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            return _pipe_closed()
        except (UsageError, Refused, DayError, eventloop.LoopChoiceError) as exc:
            print(f"callgate: error: {exc}", file=sys.stderr)
            return 2
        except CheckFailed as exc:
            print(str(exc), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            if os.environ.get("CALLGATE_DEBUG"):
                raise
            from agent.money import clip

            print(f"callgate: internal error: {type(exc).__name__}: "
                  f"{clip(str(exc).replace(chr(10), '; '), 300)} "
                  "(CALLGATE_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 1
    except BrokenPipeError:  # the reader of stderr is gone too
        return _pipe_closed()


def _pipe_closed() -> int:
    """The reader went away (``callgate … | head``): stop quietly, as ``cat`` would.

    stdout is pointed at /dev/null so the interpreter's final flush cannot fail
    again on the closed pipe.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass
    finally:
        os.close(devnull)
    return 141  # 128 + SIGPIPE, what a shell reports for a command the pipe ended
