"""The SQLite ledger's point reads on the event loop's own read-only connection.

They must see every commit at once (the worker's and another process's), fall
back to the worker when the file is busy or the caller is on another thread,
and never keep a read transaction open (which would hold back the WAL
checkpoint and grow the -wal file without bound).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from agent.ledger import CallRecord, open_ledger
from agent.ledger.sqlite import SqliteLedger

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


async def _ledger(tmp_path: Path) -> SqliteLedger:
    ledger = await open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert isinstance(ledger, SqliteLedger)
    return ledger


def _call(call_id: str, at: datetime) -> CallRecord:
    return CallRecord(call_id=call_id, account="acme", node="n1", caller="02100000001",
                      callee="13800000000", tariff_name="std", rate=Decimal("0.13"),
                      increment=60, minimum=60, admitted_at=at)


async def test_point_reads_see_each_commit_at_once(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    try:
        assert ledger._reader is not None  # the reads below take the in-loop path
        await ledger.topup("acme", Decimal("10"), ref="t1", at=T0)
        assert (await ledger.balance("acme")).available == Decimal("10")
        # Another process's commit (the finance CLI): seen by the very next read.
        other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE accounts SET posted = posted + 50000 WHERE id = 'acme'")
        other.execute("COMMIT")
        other.close()
        assert (await ledger.balance("acme")).available == Decimal("15")
        for i in range(20):
            call_id = f"c{i}"
            assert await ledger.admit_call(_call(call_id, T0 + timedelta(seconds=i)), None)
            record = await ledger.get_call(call_id)
            assert record is not None and record.call_id == call_id
            state = await ledger.account_state("acme")
            assert state.live_calls == i + 1
    finally:
        await ledger.close()


async def test_point_reads_hold_no_read_transaction_open(tmp_path: Path) -> None:
    """After interleaved reads and writes, a checkpoint can move every WAL frame."""
    ledger = await _ledger(tmp_path)
    try:
        await ledger.topup("acme", Decimal("100"), ref="t1", at=T0)
        for i in range(50):
            await ledger.admit_call(_call(f"c{i}", T0), None)
            await ledger.get_call(f"c{i}")
            await ledger.balance("acme")
            await ledger.account_state("acme", account_since=T0, callee_since=T0,
                                        destination="13800000000")
        probe = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
        busy, frames, moved = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        probe.close()
        assert busy == 0
        assert frames == moved, f"{frames - moved} WAL frames held back by an open read"
    finally:
        await ledger.close()


class _BusyReader:
    """Stands in for the reader while another process recovers the file."""

    def execute(self, *_args: object) -> object:
        raise sqlite3.OperationalError("database is locked")


async def test_a_busy_reader_hands_the_read_to_the_worker(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    try:
        await ledger.topup("acme", Decimal("7"), ref="t1", at=T0)
        ledger._reader = _BusyReader()  # type: ignore[assignment]
        assert (await ledger.balance("acme")).available == Decimal("7")
        assert (await ledger.account_state("acme")).available == Decimal("7")
        assert await ledger.get_call("nope") is None
    finally:
        ledger._reader = None
        await ledger.close()


async def test_reads_from_another_thread_use_the_worker(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    try:
        await ledger.topup("acme", Decimal("3"), ref="t1", at=T0)
        seen: list[Decimal] = []

        def other_thread() -> None:
            seen.append(asyncio.run(ledger.balance("acme")).available)

        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert seen == [Decimal("3")]
    finally:
        await ledger.close()


async def test_a_closed_ledger_refuses_point_reads(tmp_path: Path) -> None:
    from agent.ledger import LedgerUnavailable

    ledger = await _ledger(tmp_path)
    await ledger.topup("acme", Decimal("1"), ref="t1", at=T0)
    await ledger.close()
    with pytest.raises(LedgerUnavailable):
        await ledger.balance("acme")
