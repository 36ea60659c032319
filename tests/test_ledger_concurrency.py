"""Racing holds never overdraw: 8 processes on one SQLite file, 8 connections on PostgreSQL.

The account is funded for exactly N increments and many more holds race for
it; exactly N may succeed, the available balance ends at zero, and the audit is
clean. Bounded: a fixed number of holds, and every child has a time limit.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest

from agent.ledger import CallRecord, open_ledger
from agent.ledger.postgres import PostgresLedger, split_options
from agent.ledger.sqlite import SqliteLedger

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
RATE = D("0.13")
N = 25  # increments the balance pays for
WORKERS = 8
CALLS_PER_WORKER = 10  # 80 holds race for 25 increments

CHILD = """
import asyncio, sys, time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from agent import eventloop
from agent.ledger.sqlite import SqliteLedger

async def main(path, worker, calls, go):
    ledger = await SqliteLedger.open(path, busy_timeout=30)
    deadline = time.monotonic() + 30
    while not Path(go).exists():  # start together, to make the race real
        if time.monotonic() > deadline:
            raise SystemExit("no start signal")
        await asyncio.sleep(0.005)
    at = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    results = await asyncio.gather(*(
        ledger.hold(f"w{worker}-c{n}", 0, Decimal("0.13"), 60, at) for n in range(calls)
    ))
    await ledger.close()
    print(sum(results))

eventloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
"""


def call(call_id: str) -> CallRecord:
    return CallRecord(call_id, "acme", "pbx-1", "021", "138", "standard", RATE, 60, 60, T0)


async def test_sqlite_processes_racing_holds_never_overdraw(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path)
    await ledger.topup("acme", RATE * N, ref="fund", at=T0)
    for worker in range(WORKERS):
        for n in range(CALLS_PER_WORKER):
            assert await ledger.admit_call(call(f"w{worker}-c{n}"), None)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(w), str(CALLS_PER_WORKER), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for w in range(WORKERS)
    ]
    try:
        await asyncio.sleep(0.3)  # let them open the file
        go.touch()
        outputs = [await asyncio.to_thread(c.communicate, timeout=60) for c in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    successes = sum(int(out) for out, _ in outputs)
    try:
        assert successes == N
        balance = await ledger.balance("acme")
        assert (balance.available, balance.held) == (D(0), RATE * N)
        assert await ledger.audit() == []
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_postgres_connections_racing_holds_never_overdraw(pg_url: str) -> None:
    setup = await open_ledger(pg_url)
    await setup.topup("acme", RATE * N, ref="fund", at=T0)
    for worker in range(WORKERS):
        for n in range(CALLS_PER_WORKER):
            assert await setup.admit_call(call(f"w{worker}-c{n}"), None)
    dsn, _ = split_options(pg_url)
    # Eight ledgers with one connection each: eight agents on eight nodes.
    nodes = [await PostgresLedger.open(dsn, pool_size=1) for _ in range(WORKERS)]
    try:
        results = await asyncio.gather(*(
            nodes[w].hold(f"w{w}-c{n}", 0, RATE, 60, T0)
            for n in range(CALLS_PER_WORKER)
            for w in range(WORKERS)
        ))
        assert sum(results) == N
        balance = await setup.balance("acme")
        assert (balance.available, balance.held) == (D(0), RATE * N)
        assert await setup.audit() == []
    finally:
        for node in nodes:
            await node.close()
        await setup.close()


@pytest.mark.postgres
async def test_postgres_admissions_racing_the_line_limit(pg_url: str) -> None:
    setup = await open_ledger(pg_url)
    await setup.topup("acme", D("100"), ref="fund", at=T0)
    dsn, _ = split_options(pg_url)
    nodes = [await PostgresLedger.open(dsn, pool_size=1) for _ in range(WORKERS)]
    try:
        results = await asyncio.gather(*(
            nodes[n % WORKERS].admit_call(call(f"c{n}"), 5) for n in range(40)
        ))
        assert sum(results) == 5
        assert len(await setup.live_calls("acme")) == 5
    finally:
        for node in nodes:
            await node.close()
        await setup.close()
