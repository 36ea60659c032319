"""``callgate run``, ``callgate demo`` and ``callgate calls``: the daemon and its live view."""

from __future__ import annotations

import argparse
from typing import Any

from agent import eventloop
from agent.cli.common import UsageError, agent_config, now, open_store, print_json, try_policy
from agent.money import format_amount


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run the agent (the systemd service runs this)")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="run the agent against the built-in PBX simulator")
    demo.add_argument("--pbx", choices=["asterisk", "freeswitch"], default="asterisk")
    demo.add_argument("--keep", action="store_true", help="keep the demo's state directory")
    demo.set_defaults(func=_demo)

    calls = sub.add_parser("calls", help="the live calls, read from the ledger")
    calls.add_argument("--account", help="only this account")
    calls.add_argument("--json", action="store_true")
    calls.set_defaults(func=_calls)


def _run(args: argparse.Namespace) -> int:
    """Synchronous on purpose: it owns the event loop for the daemon's whole life."""
    from agent.daemon import Daemon, StartupError
    from agent.logs import configure_logging

    config = agent_config(args)
    if config is None:
        raise UsageError("run needs an agent config: -c /etc/callgate/agent.yaml "
                         "(or CALLGATE_CONFIG)")
    configure_logging(config.spec.log.format, config.spec.log.level)
    try:
        return eventloop.run(Daemon(config).run())
    except StartupError as exc:
        from agent.cli.common import CheckFailed

        raise CheckFailed(f"callgate: cannot start: {exc}") from None


def _demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return eventloop.run(run_demo(args.pbx, args.keep))


async def _calls(args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo

    from agent.ledger import LedgerError

    ledger = await open_store(args)
    try:
        if args.account is not None:
            await ledger.balance(args.account)  # an account the ledger lacks is refused
        records = await ledger.live_calls(args.account)
    except LedgerError as exc:
        raise UsageError(str(exc)) from None
    finally:
        await ledger.close()
    current = now()
    # Times in each account's zone, as in its statement (UTC for an account the
    # policy no longer has); the zone is printed with every time.
    policy = try_policy(args)
    utc = ZoneInfo("UTC")

    def zone_of(account: str) -> ZoneInfo:
        entry = policy.accounts.get(account) if policy is not None else None
        return entry.hours.timezone if entry is not None else utc

    rows: list[dict[str, Any]] = []
    for r in records:
        elapsed = int((current - r.answered_at).total_seconds()) if r.answered_at else None
        paid_until = None
        if r.answered_at is not None:
            from datetime import timedelta

            paid_until = r.answered_at + timedelta(seconds=r.paid_seconds)
        rows.append({
            "call_id": r.call_id, "account": r.account, "node": r.node, "caller": r.caller,
            "callee": r.callee, "status": r.status.value, "answered_at": r.answered_at,
            "elapsed_seconds": elapsed, "paid_seconds": r.paid_seconds,
            "paid_until": paid_until, "held": r.held, "tariff": r.tariff_name,
        })
    if args.json:
        print_json({"calls": rows, "count": len(rows), "at": current})
        return 0
    if not rows:
        print("no live calls")
        return 0
    print(f"{'ACCOUNT':<10} {'CALLER':<13} {'CALLEE':<14} {'STATUS':<9} {'ANSWERED':<12} "
          f"{'ELAPSED':>7} {'PAID':>6} {'HELD':>8}  CALL")
    for row in rows:
        answered = row["answered_at"].astimezone(zone_of(row["account"])).strftime(
            "%H:%M:%S %Z") if row["answered_at"] else "-"
        shown = f"{row['elapsed_seconds']}s" if row["elapsed_seconds"] is not None else "-"
        print(f"{row['account']:<10} {row['caller']:<13} {row['callee']:<14} "
              f"{row['status']:<9} {answered:<12} {shown:>7} {row['paid_seconds']:>5}s "
              f"{format_amount(row['held']):>8}  {row['call_id']}")
    print(f"{len(rows)} live call(s)")
    return 0
