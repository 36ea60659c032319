"""CPU and context switches of one call's ledger work, by the path its writes take.

One gated, answered and settled call costs the SQLite ledger what the daemon
asks of it per call on the real FreeSWITCH (bench/cpu_per_call.py): the gate's
read (``account_state``), its admission (``admit_and_hold``), the meter's
``get_call`` at answer, ``answer_call``, ``settle_call`` and the low-balance
check's ``balance``: 3 durable writes, 3 point reads on the event loop's
reader. Calls run one after another, so no commit is shared; ``--gap 0.2`` idles
0.2 s before each (the spacing of 5 calls/s: the threads sleep between calls and the
machine's other work runs, as beside a PBX), and the idle time is not counted.

Write paths, measured in the same run, rounds alternating:

* ``worker`` (shipped): each write goes to the worker thread, which commits with
  ``synchronous=FULL`` and hands the reply back to the loop;
* ``loop_fdatasync`` (the candidate of RESULTS.md, session 7 cpu2): the write's
  statements and COMMIT run on the event loop's thread with
  ``synchronous=OFF``, then one thread ``fdatasync``s the ``-wal`` file and the
  write is acknowledged after it: the same durability as FULL for the
  acknowledged write, one thread hand-off (the fsync's) instead of the
  worker's. (Checkpoints are left out here; a real version would have to run
  them synced.)
* ``loop_full``: statements and a FULL COMMIT on the loop's thread, the fsync
  blocking the loop: no hand-off at all (a reference, not a design: the loop
  would stall for every fsync);
* ``loop_nosync``: the same with ``synchronous=OFF`` and no fsync: what the
  SQL costs without durability (a lower bound, not acceptable).

CPU is the process's (every thread, user + system, ``getrusage``), context
switches voluntary + involuntary. Usage: ``python bench/ledger_handoff.py
[--calls 300] [--rounds 3] [--gap 0]``; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.eventloop import run as run_loop  # noqa: E402
from agent.ledger.model import CallRecord, Cdr  # noqa: E402
from agent.ledger.sqlite import SqliteLedger  # noqa: E402

T = TypeVar("T")
MODES = ("worker", "loop_fdatasync", "loop_full", "loop_nosync")


class _Syncer(threading.Thread):
    """One thread that fdatasyncs a file descriptor and wakes the loop after."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="fdatasync")
        self.jobs: queue.SimpleQueue[tuple[int, asyncio.AbstractEventLoop,
                                           asyncio.Future[None]] | None] = queue.SimpleQueue()
        self.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fd, loop, future = job
            os.fdatasync(fd)
            loop.call_soon_threadsafe(future.set_result, None)


class LoopWriteLedger(SqliteLedger):
    """The ledger with its writes on the loop's thread (see the module docstring)."""

    mode = "loop_full"
    _conn: sqlite3.Connection | None = None
    _wal_fd = -1
    _syncer: _Syncer | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=" + ("FULL" if self.mode == "loop_full" else "OFF"))
            conn.execute("PRAGMA foreign_keys=ON")
            if self.mode == "loop_fdatasync":
                conn.execute("PRAGMA wal_autocheckpoint=0")
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDWR)
                self._syncer = _Syncer()
            self._conn = conn
        return self._conn

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *,
                     abandonable: bool = False) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if self._syncer is not None:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            self._syncer.jobs.put((self._wal_fd, loop, done))
            await done
        return result

    async def close(self) -> None:
        if self._syncer is not None:
            self._syncer.jobs.put(None)
        if self._conn is not None:
            self._conn.close()
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
        await super().close()


def usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw + r.ru_nivcsw


async def one_round(mode: str, calls: int, workdir: Path, gap: float) -> dict[str, float]:
    path = workdir / f"{mode}.db"
    ledger = await SqliteLedger.open(path)  # creates and migrates through the worker
    if mode != "worker":
        await ledger.close()
        ledger = await LoopWriteLedger.open(path)
        assert isinstance(ledger, LoopWriteLedger)
        ledger.mode = mode
    now = datetime.now(UTC)
    await ledger.topup("acme", Decimal("100000"), ref="t-1", at=now)
    await ledger.balance("acme")
    cpu0, switches0 = usage()
    wall0 = time.perf_counter()
    slept = 0.0
    for i in range(calls):
        if gap:
            began = time.perf_counter()
            await asyncio.sleep(gap)
            slept += time.perf_counter() - began
        call_id = f"call-{i}"
        await ledger.account_state("acme")
        record = CallRecord(call_id=call_id, account="acme", node="bench", caller="1001",
                            callee="13800138000", tariff_name="default", rate=Decimal("0.10"),
                            increment=60, minimum=60, admitted_at=now)
        await ledger.admit_and_hold(record, None, Decimal("0.10"), 60, reason="allowed")
        await ledger.get_call(call_id)
        await ledger.answer_call(call_id, now)
        await ledger.settle_call(Cdr(
            call_id=call_id, account="acme", caller="1001", callee="13800138000",
            answered_at=now, ended_at=now + timedelta(seconds=30), billsec=30,
            billed_seconds=60, amount=Decimal("0.10"), cause="NORMAL_CLEARING"))
        await ledger.balance("acme")
    wall = time.perf_counter() - wall0 - slept
    cpu1, switches1 = usage()
    balance = await ledger.balance("acme")
    await ledger.close()
    assert balance.posted == Decimal("100000") - Decimal("0.10") * calls, balance
    return {"cpu_us_per_call": (cpu1 - cpu0) / calls * 1e6,
            "switches_per_call": (switches1 - switches0) / calls,
            "wall_ms_per_call": wall / calls * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.0,
                        help="seconds of idle before each call (0.2 = the spacing of 5 calls/s)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cghandoff", dir=os.environ.get("TMPDIR", "/tmp")))
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    try:
        for r in range(args.rounds):
            for mode in MODES:
                rdir = workdir / f"r{r}"
                rdir.mkdir(exist_ok=True)
                runs[mode].append(run_loop(one_round(mode, args.calls, rdir, args.gap)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {"bench": "ledger_handoff", "calls": args.calls,
                              "rounds": args.rounds, "gap": args.gap,
                              "loadavg": os.getloadavg()[0]}
    spacing = f"{args.gap:g} s apart" if args.gap else "in a row"
    print(f"one call's ledger work ({args.calls} calls {spacing}, median of {args.rounds} "
          f"rounds; load average {os.getloadavg()[0]:.2f})")
    for mode in MODES:
        med = {k: round(statistics.median(x[k] for x in runs[mode]), 1)
               for k in runs[mode][0]}
        result[mode] = med
        print(f"  {mode:15s} {med['cpu_us_per_call']:7.0f} µs CPU  "
              f"{med['switches_per_call']:5.1f} context switches  "
              f"{med['wall_ms_per_call']:6.2f} ms wall per call")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
