"""Kill -9 a writer mid-stream: every acknowledged posting survives, nothing is half-written.

The child writes top-ups, holds and settlements from several tasks at once (so
SQLite group commits are in flight when it dies) and prints each posting's key
only after the ledger acknowledged it. After SIGKILL the store is reopened:
every printed key must be there and the audit must be clean (no posting
without its balance change, no ended call with an open hold or without a CDR).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from agent.ledger import open_ledger

ROOT = Path(__file__).resolve().parents[1]
ACKED_BEFORE_KILL = 300  # lines read before the kill; the child would go on for ever

CHILD = """
import asyncio, sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from agent import eventloop
from agent.ledger import CallRecord, Cdr, open_ledger

def ack(account, key):
    sys.stdout.write(f"{account} {key}\\n")
    sys.stdout.flush()

async def writer(ledger, task):
    account = f"acct{task}"
    t0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    i = 0
    while True:
        at = t0 + timedelta(seconds=i)
        p = await ledger.topup(account, Decimal("1.00"), ref=f"t{i}", at=at)
        ack(account, p.key)
        call_id = f"{task}-{i}"
        await ledger.admit_call(CallRecord(call_id, account, "n", "021", "138", "std",
                                           Decimal("0.13"), 60, 60, at), None)
        await ledger.answer_call(call_id, at)
        if await ledger.hold(call_id, 0, Decimal("0.13"), 60, at):
            ack(account, f"hold:{call_id}:0")
        cdr = Cdr(call_id, account, "021", "138", at, at + timedelta(seconds=30), 30, 60,
                  Decimal("0.13"), "NORMAL_CLEARING")
        await ledger.settle_call(cdr)
        ack(account, f"charge:{call_id}")
        i += 1

async def main(url):
    ledger = await open_ledger(url)
    await asyncio.gather(*(writer(ledger, t) for t in range(4)))

eventloop.run(main(sys.argv[1]))
"""


async def test_a_killed_writer_loses_no_acknowledged_posting(ledger_url: str) -> None:
    first = await open_ledger(ledger_url)  # create the schema before the child races it
    await first.close()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, ledger_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    acked: list[tuple[str, str]] = []
    try:
        assert child.stdout is not None
        while len(acked) < ACKED_BEFORE_KILL:
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            if not line:
                raise AssertionError(f"the writer died by itself: {child.stderr.read()}")
            account, key = line.split()
            acked.append((account, key))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        # Lines already in the pipe were acknowledged too.
        for line in child.stdout.read().splitlines():
            parts = line.split()
            if len(parts) == 2:
                acked.append((parts[0], parts[1]))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
        if child.stderr is not None:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    reopened = await open_ledger(ledger_url)
    try:
        stored: set[tuple[str, str]] = set()
        for account in {a for a, _ in acked}:
            stored |= {(account, p.key) for p in await reopened.history(account)}
        missing = [k for k in acked if k not in stored]
        assert missing == []
        assert await reopened.audit() == []
    finally:
        await reopened.close()
