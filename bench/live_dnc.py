"""The live do-not-call list at 1,000,000 entries: load, memory, lookups, the sync poll.

Fills a SQLite ledger (in a temp dir; ``--pg URL`` a PostgreSQL schema as well)
with N live entries for one account, then reports: the time to load the
snapshot into the gate's in-memory copy, the peak memory of a load
(tracemalloc, on a second load) and what the copy holds afterwards;
lookups per second through ``LiveDnc.listed`` against the policy-file
``DncSet`` holding the same numbers (the baseline, same run); the latency of
one empty sync poll (``dnc_changes``), which is all a quiet ledger costs every
0.25 s; and decide() per second with the live copy against decide() without
it. Targets: load <= 5 s and holds <= 10 MB for 1,000,000 entries; a lookup no more
than 3x the file set's; a poll well under a millisecond on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from agent.calls import CallInfo, Direction
from agent.compliance.dnc_sync import DncSync
from agent.gate.decide import decide
from agent.gate.decision import AccountState
from agent.gate.dnc import DncSet
from agent.gate.policy import load_policy
from agent.ledger import open_ledger

POLICY = """version: 1
defaults:
  calling_hours: [{days: all, windows: [{start: "00:00", end: "24:00"}]}]
accounts:
  acme: {name: ACME, caller_ids: ["02158880000"]}
"""


async def _create(url: str) -> None:
    """Open (creating the schema) and close."""
    await (await open_ledger(url)).close()


def fill_sqlite(path: Path, numbers: list[str]) -> None:
    conn = sqlite3.connect(path)
    at = 0
    with conn:
        conn.executemany("INSERT INTO dnc_log (account, number, added, reason, operator, at)"
                         " VALUES ('acme', ?, 1, 'bench', 'bench', ?)",
                         ((n, at) for n in numbers))
        conn.execute("INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
                     " SELECT account, number, reason, operator, at, seq FROM dnc_log")
    conn.close()


async def fill_pg(url: str, numbers: list[str]) -> None:
    import asyncpg

    from agent.ledger.postgres import split_options

    dsn, _ = split_options(url)
    conn = await asyncpg.connect(dsn)
    try:
        now = datetime.now(UTC)
        await conn.copy_records_to_table(
            "dnc_log", records=[("acme", n, True, "bench", "bench", now) for n in numbers],
            columns=["account", "number", "added", "reason", "operator", "at"])
        await conn.execute("INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
                           " SELECT account, number, reason, operator, at, seq FROM dnc_log")
    finally:
        await conn.close()


async def measure(url: str, probes: list[str], polls: int) -> dict[str, float]:
    ledger = await open_ledger(url)
    try:
        started = time.perf_counter()
        sync = DncSync(ledger)
        await sync.load()
        load_s = time.perf_counter() - started
        tracemalloc.start()  # a second load, for memory only (tracemalloc slows it down)
        await DncSync(ledger).load()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        started = time.perf_counter()
        for _ in range(polls):
            await sync.poll()
        poll_ms = (time.perf_counter() - started) / polls * 1000
        return {"load_s": round(load_s, 2), "load_peak_mb": round(peak / 1e6, 1),
                "held_mb": round(sync.live.nbytes / 1e6, 1), "entries": len(sync.live),
                "poll_ms": round(poll_ms, 3), "sync": sync}  # type: ignore[dict-item]
    finally:
        await ledger.close()


def rate(fn, items: list[str]) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--probes", type=int, default=200_000)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--pg", help="also measure a PostgreSQL ledger (URL with search_path)")
    args = parser.parse_args()
    rng = random.Random(20)
    numbers = sorted({f"13{rng.randrange(10**9):09d}" for _ in range(args.entries)})
    probes = [rng.choice(numbers) if i % 2 else f"15{rng.randrange(10**9):09d}"
              for i in range(args.probes)]
    report: dict[str, object] = {"entries": len(numbers)}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ledger.db"
        asyncio.run(_create(f"sqlite://{db}"))
        fill_sqlite(db, numbers)
        result = asyncio.run(measure(f"sqlite://{db}", probes, args.polls))
        live = result.pop("sync").live  # type: ignore[attr-defined]
        report["sqlite"] = result
        if args.pg:
            asyncio.run(_create(args.pg))
            asyncio.run(fill_pg(args.pg, numbers))
            pg = asyncio.run(measure(args.pg, probes, args.polls))
            pg.pop("sync")
            report["postgres"] = pg
        baseline = DncSet.of(numbers)
        file_rate = live_rate = 0.0
        for _ in range(3):
            file_rate = max(file_rate, rate(baseline.__contains__, probes))
            live_rate = max(live_rate, rate(lambda n: live.listed("acme", n), probes))
        report["lookups_per_s"] = {"file_set": round(file_rate), "live": round(live_rate),
                                   "cost_ratio": round(file_rate / live_rate, 2)}
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(POLICY)
        policy = load_policy(policy_path)
        now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
        requests = [CallInfo(f"c{i}", Direction.OUTBOUND, "02158880000", n, "acme", "")
                    for i, n in enumerate(probes[:50_000])]
        plain = AccountState(balance=Decimal(100))
        with_live = AccountState(balance=Decimal(100), live_dnc=live)
        base_rate = dnc_rate = 0.0
        for _ in range(3):  # interleaved, best of three: the first pass warms caches
            base_rate = max(base_rate, rate(lambda r: decide(policy, plain, r, now), requests))
            dnc_rate = max(dnc_rate, rate(lambda r: decide(policy, with_live, r, now), requests))
        report["decide_per_s"] = {"without_live_dnc": round(base_rate),
                                  "with_live_dnc": round(dnc_rate),
                                  "cost_ratio": round(base_rate / dnc_rate, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
