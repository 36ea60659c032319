"""Durable hold+charge pairs per second on each ledger backend, against raw loops.

A *pair* is what metering one increment of a call costs the ledger: a hold
(``Ledger.hold``: the conditional reservation) and its charge
(``Ledger.settle_call``: charge, release, end the call, store the CDR). The
calls are admitted before the clock starts. Every commit is durable.

SQLite (WAL, ``synchronous=FULL``), measured in the same run:
* ``ledger_serial``: one task, hold then settle, one call after another: two
  commits per pair, each waited for;
* ``ledger_concurrent``: ``--tasks`` tasks doing the same at once (the meter has
  many calls in flight); the worker thread group-commits what arrives together;
* ``raw_same_tx``: plain sqlite3 on the main thread running the very statements
  the ledger runs, in the same two transactions per pair;
* ``raw_one_tx``: the same statements, one transaction per pair (the issue's
  baseline; it needs one fsync per pair where the ledger API needs two).

PostgreSQL (database ``test`` at 127.0.0.1:5432, a scratch schema dropped at the
end), ``--pg-connections`` concurrent connections, one account each:
* ``ledger``: the asyncpg ledger, one task per connection;
* ``raw_same_tx``: raw asyncpg connections running the same statements in the
  same transactions;
* ``ledger_one_account``: the ledger again, but all calls on one account (a call
  centre with many lines): the account row lock serialises its holds.

Each mode runs ``--rounds`` times, modes alternating; the median is reported
with the machine's load average (this box is shared). Targets (issue 3):
SQLite >= 2,000 pairs/s and >= 0.5 of raw; PostgreSQL >= 1,000 pairs/s with 8
connections. Usage: ``python bench/ledger.py [--pairs N] [--rounds R]
[--tasks T] [--pg-connections C] [--no-pg]``; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import eventloop
from agent.ledger import CallRecord, Cdr
from agent.ledger import _rules as rules
from agent.ledger.postgres import PostgresLedger
from agent.ledger.sqlite import SqliteLedger

AT = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
RATE = Decimal("0.13")
UNITS = 1300  # 0.13 in minor units
PG_BASE = "postgresql://root@127.0.0.1:5432/test"


def call_record(call_id: str, account: str) -> CallRecord:
    return CallRecord(call_id, account, "bench", "021", "138", "standard", RATE, 60, 60, AT)


def cdr(call_id: str, account: str) -> Cdr:
    return Cdr(call_id, account, "021", "138", AT, AT, 30, 60, RATE, "NORMAL_CLEARING")


async def admit_all(ledger: Any, accounts: list[str], per_account: int, tag: str) -> None:
    for account in accounts:
        await ledger.topup(account, Decimal("1000000"), ref=f"fund-{tag}", at=AT)
    await asyncio.gather(*(
        ledger.admit_call(call_record(f"{tag}-{a}-{n}", a), None)
        for a in accounts for n in range(per_account)
    ))


async def ledger_pairs(ledger: Any, accounts: list[str], per_account: int, tag: str,
                       tasks: int) -> float:
    """Pairs/s with ``tasks`` concurrent workers, each on its own calls.

    Contiguous slices: with as many tasks as accounts each task meters one
    account's calls, as the raw PostgreSQL loop does with its connections.
    """
    ids = [(f"{tag}-{a}-{n}", a) for a in accounts for n in range(per_account)]
    size = -(-len(ids) // tasks)
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)]

    async def worker(mine: list[tuple[str, str]]) -> None:
        for call_id, account in mine:
            if not await ledger.hold(call_id, 0, RATE, 60, AT):
                raise SystemExit("bench account ran out of money")
            await ledger.settle_call(cdr(call_id, account))

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in chunks))
    return len(ids) / (time.perf_counter() - start)


# -- raw SQLite: the ledger's statements, without the ledger ---------------------------------
def raw_sqlite_hold(conn: sqlite3.Connection, call_id: str, when: int) -> None:
    call = conn.execute("SELECT account, status FROM calls WHERE call_id = ?",
                        (call_id,)).fetchone()
    account = call[0]
    key = rules.hold_key(call_id, 0)
    conn.execute("SELECT amount FROM postings WHERE account = ? AND key = ?",
                 (account, key)).fetchone()
    cur = conn.execute("UPDATE accounts SET held = held + ?"
                       " WHERE id = ? AND NOT closed AND posted - held >= ?",
                       (UNITS, account, UNITS))
    assert cur.rowcount == 1
    conn.execute("INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                 " VALUES (?, 'hold', ?, ?, ?, ?, ?)", (account, UNITS, when, call_id, key,
                                                        call_id))
    conn.execute("UPDATE calls SET held = held + ?, paid_seconds = max(paid_seconds, ?),"
                 " steps = steps + 1 WHERE call_id = ?", (UNITS, 60, call_id))


def raw_sqlite_settle(conn: sqlite3.Connection, call_id: str, when: int) -> None:
    call = conn.execute("SELECT account, held FROM calls WHERE call_id = ?",
                        (call_id,)).fetchone()
    account = call[0]
    conn.execute("SELECT * FROM cdrs WHERE call_id = ?", (call_id,)).fetchone()
    conn.execute("INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                 " VALUES (?, 'charge', ?, ?, ?, ?, ?)",
                 (account, UNITS, when, call_id, rules.charge_key(call_id), call_id))
    conn.execute("UPDATE accounts SET posted = posted - ?, held = held - ? WHERE id = ?",
                 (UNITS, UNITS, account))
    conn.execute("UPDATE calls SET held = 0, status = 'ended', ended_at = ? WHERE call_id = ?",
                 (when, call_id))
    conn.execute(
        "INSERT INTO cdrs (call_id, account, caller, callee, answered_at, ended_at, billsec,"
        " billed_seconds, amount, cause, cut_off, flags, node, submitted)"
        " VALUES (?, ?, '021', '138', ?, ?, 30, 60, ?, 'NORMAL_CLEARING', 0, '[]', '', ?)"
        " RETURNING *",
        (call_id, account, when, when, UNITS, rules.cdr_fingerprint(cdr(call_id, account))),
    ).fetchone()


def raw_sqlite_pairs(path: Path, accounts: list[str], per_account: int, tag: str,
                     one_tx: bool) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    ids = [f"{tag}-{a}-{n}" for a in accounts for n in range(per_account)]
    when = rules.to_micros(AT)
    start = time.perf_counter()
    for call_id in ids:
        conn.execute("BEGIN IMMEDIATE")
        raw_sqlite_hold(conn, call_id, when)
        if not one_tx:
            conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
        raw_sqlite_settle(conn, call_id, when)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return len(ids) / elapsed


async def bench_sqlite(args: argparse.Namespace) -> dict[str, Any]:
    accounts = [f"acct{i}" for i in range(args.accounts)]
    per_account = max(1, args.pairs // len(accounts))
    results: dict[str, list[float]] = {k: [] for k in
                                       ("ledger_serial", "ledger_concurrent",
                                        "raw_same_tx", "raw_one_tx")}
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as directory:
        path = Path(directory) / "ledger.db"
        ledger = await SqliteLedger.open(path)
        try:
            for round_no in range(args.rounds):
                for mode in results:
                    tag = f"r{round_no}-{mode}"
                    await admit_all(ledger, accounts, per_account, tag)
                    if mode == "ledger_serial":
                        rate = await ledger_pairs(ledger, accounts, per_account, tag, 1)
                    elif mode == "ledger_concurrent":
                        rate = await ledger_pairs(ledger, accounts, per_account, tag,
                                                  args.tasks)
                    else:
                        rate = await asyncio.to_thread(
                            raw_sqlite_pairs, path, accounts, per_account, tag,
                            mode == "raw_one_tx")
                    results[mode].append(rate)
            problems = await ledger.audit()
        finally:
            await ledger.close()
    if problems:
        raise SystemExit(f"audit after the SQLite bench: {problems[:3]}")
    return {mode: statistics.median(rates) for mode, rates in results.items()}


# -- PostgreSQL ---------------------------------------------------------------------------------
async def raw_pg_pairs(dsn: str, accounts: list[str], per_account: int, tag: str) -> float:
    import asyncpg

    conns = [await asyncpg.connect(dsn) for _ in accounts]
    fingerprint = {a: rules.cdr_fingerprint(cdr("x", a)) for a in accounts}

    async def worker(conn: Any, account: str) -> None:
        for n in range(per_account):
            call_id = f"{tag}-{account}-{n}"
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT account, status FROM calls WHERE call_id = $1 FOR UPDATE", call_id)
                await conn.fetchval("SELECT amount FROM postings WHERE account = $1 AND key = $2",
                                    row["account"], rules.hold_key(call_id, 0))
                ok = await conn.fetchval(
                    "UPDATE accounts SET held = held + $1"
                    " WHERE id = $2 AND NOT closed AND posted - held >= $1 RETURNING true",
                    UNITS, account)
                assert ok
                await conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                    " VALUES ($1, 'hold', $2, $3, $4, $5, $4)",
                    account, UNITS, AT, call_id, rules.hold_key(call_id, 0))
                await conn.execute(
                    "UPDATE calls SET held = held + $1,"
                    " paid_seconds = greatest(paid_seconds, $2), steps = steps + 1"
                    " WHERE call_id = $3", UNITS, 60, call_id)
            async with conn.transaction():
                await conn.fetchrow(
                    "SELECT account, held FROM calls WHERE call_id = $1 FOR UPDATE", call_id)
                await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", call_id)
                await conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                    " VALUES ($1, 'charge', $2, $3, $4, $5, $4)",
                    account, UNITS, AT, call_id, rules.charge_key(call_id))
                await conn.execute(
                    "UPDATE accounts SET posted = posted - $1, held = held - $2 WHERE id = $3",
                    UNITS, UNITS, account)
                await conn.execute(
                    "UPDATE calls SET held = 0, status = 'ended', ended_at = $1"
                    " WHERE call_id = $2", AT, call_id)
                await conn.fetchrow(
                    "INSERT INTO cdrs (call_id, account, caller, callee, answered_at, ended_at,"
                    " billsec, billed_seconds, amount, cause, cut_off, flags, node, submitted)"
                    " VALUES ($1, $2, '021', '138', $3, $3, 30, 60, $4, 'NORMAL_CLEARING',"
                    " false, '[]', '', $5) RETURNING *",
                    call_id, account, AT, UNITS, fingerprint[account])

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, a) for c, a in zip(conns, accounts, strict=True)))
        return len(accounts) * per_account / (time.perf_counter() - start)
    finally:
        for conn in conns:
            await conn.close()


async def _pg_admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_BASE, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def bench_pg(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"bench_ledger_{uuid.uuid4().hex[:8]}"
    await _pg_admin(f'CREATE SCHEMA "{schema}"')
    dsn = f"{PG_BASE}?search_path={schema}"
    accounts = [f"acct{i}" for i in range(args.pg_connections)]
    per_account = max(1, args.pg_pairs // len(accounts))
    results: dict[str, list[float]] = {"ledger": [], "raw_same_tx": [], "ledger_one_account": []}
    try:
        ledger = await PostgresLedger.open(dsn, pool_size=args.pg_connections)
        try:
            for round_no in range(args.rounds):
                for mode in results:
                    tag = f"r{round_no}-{mode}"
                    if mode != "ledger_one_account":
                        await admit_all(ledger, accounts, per_account, tag)
                    if mode == "ledger":
                        rate = await ledger_pairs(ledger, accounts, per_account, tag,
                                                  len(accounts))
                    elif mode == "ledger_one_account":
                        # One call centre with many lines: every hold and charge
                        # takes the same account row lock, held until its commit.
                        solo = [f"solo{round_no}"]
                        await admit_all(ledger, solo, per_account * len(accounts), tag)
                        rate = await ledger_pairs(ledger, solo, per_account * len(accounts),
                                                  tag, len(accounts))
                    else:
                        rate = await raw_pg_pairs(dsn, accounts, per_account, tag)
                    results[mode].append(rate)
            problems = await ledger.audit()
        finally:
            await ledger.close()
    finally:
        await _pg_admin(f'DROP SCHEMA "{schema}" CASCADE')
    if problems:
        raise SystemExit(f"audit after the PostgreSQL bench: {problems[:3]}")
    return {mode: statistics.median(rates) for mode, rates in results.items()}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"bench": "ledger", "load_average": round(os.getloadavg()[0], 2)}
    sqlite = await bench_sqlite(args)
    print(f"SQLite ({args.pairs} pairs x {args.rounds} rounds, median):")
    for mode, rate in sqlite.items():
        print(f"  {mode:18} {rate:9.0f} pairs/s")
    figures.update({f"sqlite_{mode}_pairs_per_s": round(rate) for mode, rate in sqlite.items()})
    figures["sqlite_serial_vs_raw_same_tx"] = round(
        sqlite["ledger_serial"] / sqlite["raw_same_tx"], 2)
    figures["sqlite_serial_vs_raw_one_tx"] = round(
        sqlite["ledger_serial"] / sqlite["raw_one_tx"], 2)
    figures["sqlite_concurrent_vs_raw_one_tx"] = round(
        sqlite["ledger_concurrent"] / sqlite["raw_one_tx"], 2)
    print(f"  ledger_serial / raw_same_tx      = {figures['sqlite_serial_vs_raw_same_tx']}")
    print(f"  ledger_serial / raw_one_tx       = {figures['sqlite_serial_vs_raw_one_tx']}")
    print(f"  ledger_concurrent / raw_one_tx   = {figures['sqlite_concurrent_vs_raw_one_tx']}"
          f"  ({args.tasks} tasks)")
    if not args.no_pg:
        try:
            pg = await bench_pg(args)
        except OSError as exc:
            print(f"PostgreSQL: not measured ({exc})")
        else:
            print(f"PostgreSQL ({args.pg_connections} connections, {args.pg_pairs} pairs x "
                  f"{args.rounds} rounds, median):")
            for mode, rate in pg.items():
                print(f"  {mode:18} {rate:9.0f} pairs/s")
            figures.update({f"pg_{mode}_pairs_per_s": round(rate) for mode, rate in pg.items()})
            figures["pg_vs_raw_same_tx"] = round(pg["ledger"] / pg["raw_same_tx"], 2)
            print(f"  ledger / raw_same_tx = {figures['pg_vs_raw_same_tx']}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="SQLite pairs per round")
    parser.add_argument("--pg-pairs", type=int, default=2000, help="PostgreSQL pairs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accounts", type=int, default=8, help="SQLite accounts")
    parser.add_argument("--tasks", type=int, default=32, help="concurrent SQLite tasks")
    parser.add_argument("--pg-connections", type=int, default=8)
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()
    figures = eventloop.run(main_async(args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
