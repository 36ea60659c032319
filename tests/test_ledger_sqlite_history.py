"""The SQLite gate path stays O(live calls) as the ledger's history grows.

Each gate decision reads the account's state (balance, live calls, attempts in
the caps' periods) and admits the call in one write. An account makes about
7,200 calls an hour at 2 CPS, so a query that reads the account's history
instead of its live calls gets slower every hour and the gate misses its
budget after a few days. SQLite has no statistics unless ANALYZE ran, and with
a covering ``(account, status)`` index it chose that index for
``status != 'ended'`` and read every call the account ever made (schema 4
dropped it). Counting the virtual machine's instructions is deterministic:
the same work on a ledger with 40 ended calls and one with 20,000 must cost
about the same.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from agent.ledger import Admission, CallRecord, open_ledger
from agent.ledger.sqlite import SqliteLedger

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
STEP = 100  # the progress handler counts in hundreds of VM instructions


def _call(call_id: str, at: datetime, callee: str = "13800000000") -> CallRecord:
    return CallRecord(call_id=call_id, account="acme", node="n1", caller="02100000001",
                      callee=callee, tariff_name="std", rate=Decimal("0.13"),
                      increment=60, minimum=60, admitted_at=at)


def _add_history(path: Path, ended: int) -> None:
    """``ended`` settled calls of last week and their attempts, written directly."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    at = int((T0 - timedelta(days=7)).timestamp() * 1_000_000)
    conn.executemany(
        "INSERT INTO calls (call_id, account, node, caller, callee, tariff_name, rate,"
        " increment, minimum, admitted_at, status, ended_at)"
        " VALUES (?, 'acme', 'n1', '02100000001', '13800000000', 'std', 1300, 60, 60,"
        " ?, 'ended', ?)", [(f"old{i}", at - i, at - i) for i in range(ended)])
    conn.executemany(
        "INSERT INTO attempts (account, destination, at, allowed, reason)"
        " VALUES ('acme', '13800000000', ?, 1, 'allowed')", [(at - i,) for i in range(ended)])
    conn.execute("COMMIT")
    conn.close()


def _counter(conn: sqlite3.Connection) -> Callable[[], int]:
    counted = [0]

    def tick() -> int:
        counted[0] += 1
        return 0

    conn.set_progress_handler(tick, STEP)
    return lambda: counted[0]


async def _gate_cost(tmp_path: Path, ended: int) -> tuple[int, int]:
    """VM instructions (hundreds) of one state read and one admission, after ``ended`` calls."""
    path = tmp_path / f"ledger-{ended}.db"
    ledger = await open_ledger(f"sqlite:///{path}")
    assert isinstance(ledger, SqliteLedger) and ledger._reader is not None
    try:
        await ledger.topup("acme", Decimal("1000"), ref="t1", at=T0)
        _add_history(path, ended)
        for i in range(40):  # some calls live, as on a working line
            assert await ledger.admit_and_hold(_call(f"live{i}", T0), None, Decimal("0.13"), 60,
                                               reason="allowed") is Admission.ADMITTED
        read_cost = _counter(ledger._reader)
        state = await ledger.account_state(
            "acme", account_since=T0 - timedelta(hours=1), callee_since=T0 - timedelta(days=1),
            destination="13800000000")
        assert (state.live_calls, state.account_attempts, state.callee_attempts) == (40, 40, 40)
        read = read_cost()

        counters: list[Callable[[], int]] = []
        await ledger._write(lambda conn: counters.append(_counter(conn)))
        outcome = await ledger.admit_and_hold(_call("new", T0, callee="13900000000"), 100,
                                              Decimal("0.13"), 60, reason="allowed")
        assert outcome is Admission.ADMITTED
        write = counters[0]()
        return read, write
    finally:
        await ledger.close()


async def test_the_gate_reads_and_admits_in_constant_work_as_history_grows(
    tmp_path: Path,
) -> None:
    small = await _gate_cost(tmp_path, 40)
    big = await _gate_cost(tmp_path, 20_000)
    # A B-tree one level deeper may cost a few more instructions; reading the
    # history would cost at least one instruction per call (200 steps of 100).
    assert big[0] <= small[0] + 10 and big[1] <= small[1] + 10, (small, big)
