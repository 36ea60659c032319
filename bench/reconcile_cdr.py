"""The PBX's CDR against the ledger: rows/s of ``callgate ledger reconcile`` and of the
daemon's CDR source, against parsing the same file alone.

A SQLite ledger in a temporary directory holds ``--calls`` settled calls of
one day (every tenth settled provisionally, ``ended_while_away``); a
FreeSWITCH ``mod_cdr_csv`` file (layout ``freeswitch-csv``) holds their rows,
the provisional ones with a PBX billsec that needs a correction. Figures,
measured in this run on the same file:

* ``parse``: the file read and parsed into rows, merged per call (the floor
  of anything that reads a CDR file);
* ``reconcile``: ``callgate ledger reconcile --json`` in-process (parse, two
  ledger reads per row, classification, the report);
* ``reconcile_apply``: the same with ``--apply`` (plus one write per
  provisional call);
* ``source``: the daemon's :class:`~agent.cdr.source.CdrSource` taking the
  whole file in one poll (each row applied: corrections written, the rest
  looked up);
* ``reconcile_peak_history_vs_day``: the peak memory (tracemalloc) of reading,
  for the day, a file that also holds the ``HISTORY_DAYS`` days before it, over
  that of reading a file of the day alone: reading streams and keeps only the
  rows within a day of the period, so this is about 2 (the day and the one
  before it), not the file's 10 days; ``reconcile_peak_vs_file``: the same
  peak over that file's size.

Usage: ``python bench/reconcile_cdr.py [--calls N]``. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from agent import eventloop
from agent.cdr.follow import FollowState, save_state
from agent.cdr.formats import parse_lines, preset
from agent.cdr.settle import merge_rows
from agent.cdr.source import CdrSource
from agent.cli import main
from agent.cli.reconcile import read_rows
from agent.ledger import CallRecord, Cdr, open_ledger
from agent.meter.clock import SimClock

DAY = datetime(2026, 12, 3, 1, 0, tzinfo=UTC)
HISTORY_DAYS = 9  # a CDR file of ten days, reconciled for its last
POLICY = """\
version: 1
prepaid: {first_topup_minimum: "0.01"}
accounts:
  acme: {name: ACME, caller_ids: ["02158880000"]}
"""


def row(call_id: str, billsec: int, answered: datetime) -> str:
    end = answered + timedelta(seconds=billsec)
    return (f'"{call_id}","acme","02158880000","13800138000","default",'
            f'"{int(answered.timestamp()) - 3}","{int(answered.timestamp())}",'
            f'"{int(end.timestamp())}","{billsec + 3}","{billsec}","NORMAL_CLEARING",'
            f'"recv_bye","bridge"\n')


async def seed(url: str, calls: int, cdr_path: Path) -> int:
    ledger = await open_ledger(url)
    provisional = 0
    try:
        await ledger.topup("acme", Decimal("100000"), ref="fund", at=DAY - timedelta(days=1))
        lines = []

        async def one(i: int) -> bool:
            call_id = f"call-{i:06d}"
            answered = DAY + timedelta(seconds=i)
            record = CallRecord(call_id, "acme", "n1", "02158880000", "13800138000",
                                "standard", Decimal("0.13"), 60, 60, answered)
            await ledger.admit_call(record, None)
            await ledger.answer_call(call_id, answered)
            assert await ledger.hold(call_id, 1, Decimal("0.13"), 60, answered)
            assert await ledger.hold(call_id, 2, Decimal("0.13"), 120, answered)
            away = i % 10 == 0
            billsec = 120 if away else 61 + i % 59
            await ledger.settle_call(Cdr(
                call_id, "acme", "02158880000", "13800138000", answered,
                answered + timedelta(seconds=billsec), billsec, 120, Decimal("0.26"),
                "NORMAL_CLEARING",
                flags=("ended_while_away", "billsec_assumed_paid") if away else ()))
            lines.append(row(call_id, 45 if away else billsec, answered))
            return away

        for start in range(0, calls, 200):  # batches share the ledger's group commits
            provisional += sum(await asyncio.gather(
                *(one(i) for i in range(start, min(calls, start + 200)))))
        cdr_path.write_text("".join(sorted(lines)))
    finally:
        await ledger.close()
    return provisional


def timed_cli(argv: list[str]) -> tuple[float, dict[str, object], int]:
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return time.perf_counter() - started, json.loads(out.getvalue()), code


async def source_pass(url: str, cdr_path: Path, state: Path) -> tuple[float, dict[str, int]]:
    ledger = await open_ledger(url)
    try:
        save_state(state, FollowState())  # following since before the rows
        source = CdrSource(ledger=ledger, path=cdr_path, layout=preset("freeswitch-csv"),
                           state_path=state, clock=SimClock(DAY + timedelta(days=1)))
        source.follower = None
        started = time.perf_counter()
        total: dict[str, int] = {}
        while True:
            report = await source.step()
            for k, v in report.outcomes.items():
                total[k] = total.get(k, 0) + v
            if not report.read:
                break
        return time.perf_counter() - started, total
    finally:
        await ledger.close()


def peak_of(path: Path, expect: int) -> int:
    """The peak traced memory of reading ``path`` for the day (bytes)."""
    import tracemalloc

    day = DAY.replace(hour=0)
    tracemalloc.start()
    reading = read_rows(path, preset("freeswitch-csv"), day, day + timedelta(days=1))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert reading.parsed == expect
    return peak


def memory(cdr_path: Path, calls: int, base: Path) -> tuple[float, float]:
    """Reading the day from a file that also holds HISTORY_DAYS days before it: its peak
    memory over that of a file of the day alone, and over the file's size."""
    history = base / "history.csv"
    with open(history, "w") as out:
        for back in range(HISTORY_DAYS, 0, -1):
            for i in range(calls):
                out.write(row(f"old-{back}-{i:06d}", 30, DAY - timedelta(days=back, seconds=-i)))
        out.write(cdr_path.read_text())
    alone = peak_of(cdr_path, calls)
    with_history = peak_of(history, calls * (HISTORY_DAYS + 1))
    return with_history / alone, with_history / history.stat().st_size


def run(calls: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="cg-reconcile-") as tmp:
        base = Path(tmp)
        (base / "policy.yaml").write_text(POLICY)
        cdr_path = base / "Master.csv"
        results: dict[str, object] = {"bench": "reconcile_cdr", "calls": calls}
        for name in ("reconcile", "source"):
            url = f"sqlite://{base}/{name}.db"
            provisional = eventloop.run(seed(url, calls, cdr_path))
            results["provisional"] = provisional
        text = cdr_path.read_text()
        started = time.perf_counter()
        rows, errors = parse_lines(text.splitlines(), preset("freeswitch-csv"))
        merged = merge_rows(rows)
        parse = time.perf_counter() - started
        assert not errors and len(merged) == calls
        argv = ["--policy", str(base / "policy.yaml"), "--ledger",
                f"sqlite://{base}/reconcile.db", "ledger", "reconcile", "--freeswitch-cdr",
                str(cdr_path), "--from", "2026-12-03", "--to", "2026-12-03", "--json"]
        plain, report, code = timed_cli(argv)
        assert code == 1 and report["counts"]["needs_correction"] == provisional  # type: ignore[index]
        applied, report, code = timed_cli([*argv, "--apply"])
        assert code == 0 and len(report["applied"]) == provisional  # type: ignore[arg-type]
        source, outcomes = eventloop.run(source_pass(f"sqlite://{base}/source.db", cdr_path,
                                                     base / "state.json"))
        assert outcomes == {"corrected": provisional, "not_needed": calls - provisional}
        history_vs_day, peak_vs_file = memory(cdr_path, calls, base)
        results.update({
            "reconcile_peak_history_vs_day": round(history_vs_day, 3),
            "reconcile_peak_vs_file": round(peak_vs_file, 3),
            "parse_rows_per_s": round(calls / parse),
            "reconcile_rows_per_s": round(calls / plain),
            "reconcile_apply_rows_per_s": round(calls / applied),
            "source_rows_per_s": round(calls / source),
            "reconcile_vs_parse": round(parse / plain, 4),
            "source_vs_parse": round(parse / source, 4),
        })
        return results


def cli() -> None:
    import logging

    import structlog

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    # One line per corrected call is the source's job in service, not a benchmark's.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = run(args.calls)
    for key, value in results.items():
        if key != "bench":
            print(f"{key:>28}: {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    cli()
