"""How long month-end takes: ``ledger report`` over every account, against the reads it needs.

A SQLite ledger is seeded with ``--accounts`` accounts of ``--calls`` settled
calls each (two holds per call, spread over two months, plus a top-up and a
fine per account). Then, measured in the same run, modes alternating,
``--rounds`` times (median reported):

* ``read``: only the reads the report makes (per account: all postings and the
  period's CDRs), the floor any report over the Ledger contract pays;
* ``statements``: what finance did before, one statement per account
  (``build_statement`` on the same reads);
* ``report``: the whole-ledger report (:func:`agent.ledger.report.account_report`
  per account, the grand totals, the flagged list).

The report reads every posting of each account since it opened (the opening
balance is their sum), so it grows with the ledger's age, not the period's
size: the figures say what that costs. Usage: ``python bench/report.py
[--accounts A] [--calls C] [--rounds R]``; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agent import eventloop
from agent.cli.ledger import build_statement
from agent.ledger import CallRecord, Cdr, open_ledger
from agent.ledger.report import account_report, flagged, totals

START = datetime(2026, 10, 1, tzinfo=UTC)
FIRST, LAST = date(2026, 11, 1), date(2026, 11, 30)
UTC_ZONE = ZoneInfo("UTC")
RATE = Decimal("0.13")


async def seed(url: str, accounts: int, calls: int) -> int:
    ledger = await open_ledger(url)
    try:
        span = timedelta(days=60) / calls
        for a in range(accounts):
            account = f"acct{a:03d}"
            await ledger.topup(account, Decimal(calls) * RATE * 3, ref="T0", at=START)

            async def one(i: int, account: str = account, a: int = a) -> None:
                answered = START + span * i + timedelta(seconds=a)
                ended = answered + timedelta(seconds=90)
                call_id = f"{account}-{i}"
                await ledger.admit_call(CallRecord(call_id, account, "n1", "0215", "138",
                                                   "std", RATE, 60, 60, answered), None)
                await ledger.answer_call(call_id, answered)
                await ledger.hold(call_id, 0, RATE, 60, answered)
                await ledger.hold(call_id, 1, RATE, 120, answered + timedelta(seconds=55))
                flags = ("vanished",) if i % 97 == 0 else ()
                await ledger.settle_call(Cdr(call_id, account, "0215", "138", answered, ended,
                                             90, 120, RATE * 2, "NORMAL_CLEARING", flags=flags))

            for batch in range(0, calls, 64):
                await asyncio.gather(*(one(i) for i in range(batch, min(calls, batch + 64))))
            await ledger.penalty(account, Decimal("10"), ref="P0", at=START + timedelta(days=45))
        return sum([len(await ledger.history(b.account)) for b in await ledger.balances()])
    finally:
        await ledger.close()


async def measure(url: str, mode: str) -> float:
    ledger = await open_ledger(url)
    try:
        begun = time.perf_counter()
        start = datetime.combine(FIRST, datetime.min.time(), tzinfo=UTC)
        end = datetime.combine(LAST + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        reports = []
        for balance in await ledger.balances():
            history = await ledger.history(balance.account)
            cdrs = await ledger.cdrs(balance.account, start, end)
            if mode == "statements":
                build_statement(balance.account, UTC_ZONE, FIRST, LAST, history, cdrs)
            elif mode == "report":
                reports.append(account_report(balance.account, start, end, history, cdrs))
                flagged(balance.account, start, end, history, cdrs)
        if mode == "report":
            totals(reports)
        return time.perf_counter() - begun
    finally:
        await ledger.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite://{Path(tmp) / 'ledger.db'}"
        seeded = time.perf_counter()
        postings = await seed(url, args.accounts, args.calls)
        seeded = time.perf_counter() - seeded
        times: dict[str, list[float]] = {"read": [], "statements": [], "report": []}
        for _ in range(args.rounds):
            for mode in times:
                times[mode].append(await measure(url, mode))
    median = {mode: statistics.median(t) for mode, t in times.items()}
    return {
        "bench": "report", "backend": "sqlite", "accounts": args.accounts,
        "calls": args.accounts * args.calls, "postings": postings, "seed_s": round(seeded, 2),
        "read_s": round(median["read"], 3), "statements_s": round(median["statements"], 3),
        "report_s": round(median["report"], 3),
        "report_over_read": round(median["report"] / median["read"], 2),
        "report_over_statements": round(median["report"] / median["statements"], 2),
        "loadavg": os.getloadavg()[0],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    print(json.dumps(eventloop.run(main(parser.parse_args()))))
