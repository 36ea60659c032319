"""The SQLite ledger's worker thread: the one owner of the writing connection.

Every write runs here; writes that arrive together are committed together
(group commit), each acknowledged only after the shared COMMIT is durable, and
a write that fails takes the batch's transaction back, so the batch is
committed again around it and one refused request fails alone. The replies of
a batch reach the event loop in one wake-up. agent/ledger/sqlite.py submits
the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.ledger.model import LedgerError, LedgerUnavailable

T = TypeVar("T")

# Writes that arrive while a commit is in flight are batched, up to this many,
# into the next transaction: enough to amortise the fsync, small enough that
# one batch never holds the write lock for long.
MAX_BATCH = 128


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any] = field(repr=False)
    # Dropped, not run, if its caller gave up before it began (see _Worker.run).
    abandonable: bool = False

    def abandoned(self) -> bool:
        return self.abandonable and self.future.cancelled()


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the work stands (it is idempotent)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver_all(replies: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in replies:
        _deliver(future, result, error)


def _unavailable(path: Path, exc: sqlite3.Error) -> LedgerUnavailable:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return LedgerUnavailable(
            f"ledger {path} stayed locked by another process past the timeout ({text})"
        )
    return LedgerUnavailable(f"ledger {path} cannot be used: {text}")


class _NotALedger(LedgerError):
    pass


class _Worker(threading.Thread):
    """The one thread that owns the sqlite3 connection."""

    def __init__(self, path: Path, busy_timeout: float, *, create: bool = True) -> None:
        super().__init__(name=f"ledger-sqlite:{path.name}", daemon=True)
        self.path = path
        self.busy_timeout = busy_timeout
        self.create = create
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._replies: list[tuple[_Job, Any, BaseException | None]] = []

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, write: bool,
               abandonable: bool = False) -> asyncio.Future[T]:
        """Queue ``fn``. A read, or a write marked ``abandonable``, whose caller is
        cancelled before it begins is dropped; any other write runs regardless (a
        settlement cancelled at shutdown still stands)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.jobs.put(_Job(fn, write, loop, future, abandonable or not write))
        return future

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        error: LedgerError | None = None
        try:
            # mode=rw never creates the file: only `ledger init` and `run` may.
            target = self.path if self.create else f"{self.path.resolve().as_uri()}?mode=rw"
            conn = sqlite3.connect(
                target, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=True, uri=not self.create,
            )
            conn.row_factory = sqlite3.Row
            if not self.create and conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone() is None:
                # Not a ledger: say so before anything (even the WAL switch) writes to it.
                conn.close()
                conn = None
                raise _NotALedger(f"{self.path} is not a callgate ledger (no callgate tables)")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            error = _unavailable(self.path, exc)
            conn = None
        except _NotALedger as exc:
            error = exc
        while True:
            job = self.jobs.get()
            if job is None:
                break
            batch = [] if job.abandoned() else [job]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                # An abandonable job (a read, the gate's admission) whose caller gave
                # up before it began (the decision budget ran out) is dropped, not
                # run: it was never started, so the caller's "unavailable" is the
                # truth. Running it anyway is what turns an overload into a collapse:
                # the queue fills with work nobody awaits, and every fresh request
                # times out behind it. (Read from
                # another thread, a future's state is one attribute: at worst a job
                # cancelled this instant still runs, as before.)
                if not more.abandoned():
                    batch.append(more)
            if not batch:
                if stop:
                    break
                continue
            if conn is None:
                assert error is not None
                for j in batch:
                    self._reply(j, None, error)
            else:
                self._run_batch(conn, batch)
            self._send_replies()
            if stop:
                break
        if conn is not None:
            conn.close()

    def _reply(self, job: _Job, result: Any, error: BaseException | None) -> None:
        self._replies.append((job, result, error))

    def _send_replies(self) -> None:
        """Hand the batch's replies to their loops: one wake-up per loop, not per job."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for job, result, error in self._replies:
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        self._replies = []
        for loop, replies in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(_deliver_all, replies)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        writes = []
        for job in batch:
            if job.write:
                writes.append(job)
                continue
            try:
                result = job.fn(conn)
            except sqlite3.Error as exc:
                self._reply(job, None, _unavailable(self.path, exc))
            except Exception as exc:
                self._reply(job, None, exc)
            else:
                self._reply(job, result, None)
        if writes:
            self._send_replies()  # the reads need not wait for the commit
            self._commit_group(conn, writes)

    def _begin(self, conn: sqlite3.Connection, jobs: list[_Job]) -> bool:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for job in jobs:
                self._reply(job, None, _unavailable(self.path, exc))
            return False
        return True

    def _commit_group(self, conn: sqlite3.Connection, writes: list[_Job]) -> None:
        """The batch's writes in one transaction, one fsync. A job that raises
        takes the transaction back; then the jobs before it are committed again
        together, it alone (to fail on its own), and the jobs after it together.

        Jobs are pure functions of the connection (they keep nothing of a run
        that was rolled back), so running one again is safe. A failure costs two
        more commits, not one per job of the batch. The common case pays no
        SAVEPOINT/RELEASE pair per job: SQLite writes each savepoint's journal
        to a temporary file (9x the write() calls of the commit itself).
        """
        if not writes:
            return
        if not self._begin(conn, writes):
            return
        if len(writes) == 1:  # alone in its transaction: nothing to undo for others
            self._commit_one(conn, writes[0])
            return
        results: list[Any] = []
        try:
            for job in writes:
                results.append(job.fn(conn))
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failed = len(results)
            self._commit_group(conn, writes[:failed])
            self._commit_group(conn, writes[failed:failed + 1])
            self._commit_group(conn, writes[failed + 1:])
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = _unavailable(self.path, exc)
            for job in writes:
                self._reply(job, None, failure)
            return
        for job, result in zip(writes, results, strict=True):
            self._reply(job, result, None)

    def _commit_one(self, conn: sqlite3.Connection, job: _Job) -> None:
        try:
            result = job.fn(conn)
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                exc = _unavailable(self.path, exc)
            self._reply(job, None, exc)
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._reply(job, None, _unavailable(self.path, exc))
            return
        self._reply(job, result, None)
