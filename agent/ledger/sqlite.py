"""The SQLite ledger: one file, durable commits, safe for the daemon and the CLI at once.

Durability and sharing: WAL journal with ``synchronous=FULL`` (a commit is on
disk before it is acknowledged), every write in ``BEGIN IMMEDIATE`` (the write
lock is taken up front, so the check-then-write of a hold cannot interleave with
another process's), and a busy timeout after which the store is reported
unavailable rather than hanging.

The event loop never waits on an fsync: one worker thread owns the writing
connection and runs every write. Writes that arrive together are committed
together (group commit), each acknowledged only after the shared COMMIT is
durable. A write that fails takes the batch's transaction back, and the batch
is committed again around it, so one refused request fails alone. The replies
of a batch reach the event loop in one wake-up.

The gate's and the meter's point reads (an account's state, a call, a
balance: a few indexed rows) run on the event loop's own read-only
connection: a WAL reader never waits for the writer, and such a read costs
less than the hand-off to the worker and back. A read that finds the file
busy (another process recovering or checkpointing it) goes to the worker,
which waits out the busy timeout there. Long reads (statements, listings)
always run on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from agent.ledger import _rules as rules
from agent.ledger._sqlite_compliance import SqliteCompliance
from agent.ledger._sqlite_schema import MIGRATIONS as MIGRATIONS
from agent.ledger._sqlite_schema import migrate
from agent.ledger._sqlite_worker import _Worker
from agent.ledger.model import (
    AccountSnapshot,
    Admission,
    Balance,
    CallRecord,
    CallStatus,
    Cdr,
    IdempotencyConflict,
    LedgerError,
    LedgerUnavailable,
    Posting,
    PostingKind,
    RefusedOperation,
    UnknownAccount,
)
from agent.money import MINOR_UNIT

T = TypeVar("T")

def _posting(row: sqlite3.Row, unit: Decimal) -> Posting:
    return Posting(
        id=row["id"],
        account=row["account"],
        kind=PostingKind(row["kind"]),
        amount=rules.from_units(row["amount"], unit),
        at=rules.from_micros(row["at"]),
        ref=row["ref"],
        key=row["key"],
        call_id=row["call_id"],
        note=row["note"],
        operator=row["operator"],
    )


def _call(row: sqlite3.Row, unit: Decimal) -> CallRecord:
    return CallRecord(
        call_id=row["call_id"],
        account=row["account"],
        node=row["node"],
        caller=row["caller"],
        callee=row["callee"],
        tariff_name=row["tariff_name"],
        rate=rules.from_units(row["rate"], unit),
        increment=row["increment"],
        minimum=row["minimum"],
        admitted_at=rules.from_micros(row["admitted_at"]),
        answered_at=None if row["answered_at"] is None else rules.from_micros(row["answered_at"]),
        paid_seconds=row["paid_seconds"],
        held=rules.from_units(row["held"], unit),
        steps=row["steps"],
        status=CallStatus(row["status"]),
    )


def _cdr(row: sqlite3.Row, unit: Decimal) -> Cdr:
    return Cdr(
        call_id=row["call_id"],
        account=row["account"],
        caller=row["caller"],
        callee=row["callee"],
        answered_at=None if row["answered_at"] is None else rules.from_micros(row["answered_at"]),
        ended_at=rules.from_micros(row["ended_at"]),
        billsec=row["billsec"],
        billed_seconds=row["billed_seconds"],
        amount=rules.from_units(row["amount"], unit),
        cause=row["cause"],
        cut_off=bool(row["cut_off"]),
        flags=tuple(json.loads(row["flags"])),
        node=row["node"],
        pbx_billsec=row["pbx_billsec"],
        correction=rules.from_units(row["correction"], unit),
    )


def _balance(row: sqlite3.Row, unit: Decimal) -> Balance:
    return Balance(
        account=row["id"],
        posted=rules.from_units(row["posted"], unit),
        held=rules.from_units(row["held"], unit),
        closed=bool(row["closed"]),
    )


def _compliance_counts(
    conn: sqlite3.Connection, account: str, cps_since: int | None, caller: str | None,
    hour_since: int | None, day_since: int | None,
) -> tuple[int, int, int, str | None]:
    """The counts the cps limit and the caller-ID cap need, and a ledger suspension."""
    cps = hour = day = 0
    if cps_since is not None:
        (cps,) = conn.execute(
            "SELECT count(*) FROM attempts WHERE account = ? AND at >= ? AND allowed",
            (account, cps_since)).fetchone()
    if caller is not None and hour_since is not None:
        (hour,) = conn.execute(
            "SELECT count(*) FROM attempts WHERE account = ? AND caller = ? AND at >= ?"
            " AND allowed", (account, caller, hour_since)).fetchone()
    if caller is not None and day_since is not None:
        (day,) = conn.execute(
            "SELECT count(*) FROM attempts WHERE account = ? AND caller = ? AND at >= ?"
            " AND allowed", (account, caller, day_since)).fetchone()
    row = conn.execute("SELECT reason FROM suspensions WHERE account = ?",
                       (account,)).fetchone()
    return cps, hour, day, None if row is None else row[0]


class SqliteLedger(rules.FinanceFront, SqliteCompliance):
    """The ledger in one SQLite file. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, unit: Decimal, worker: _Worker, *,
                 max_posting: Decimal = rules.DEFAULT_MAX_POSTING, created: bool = False) -> None:
        self.path = path
        self.unit = unit
        self.max_posting = max_posting
        self.created = created  # this open made the store
        self._worker = worker
        self._reader: sqlite3.Connection | None = None
        self._reader_thread = threading.get_ident()
        with contextlib.suppress(sqlite3.Error):  # no reader: every read goes to the worker
            reader = sqlite3.connect(path, timeout=0, isolation_level=None,
                                     check_same_thread=True)
            reader.row_factory = sqlite3.Row
            reader.execute("PRAGMA query_only=ON")
            self._reader = reader

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        minor_unit: Decimal = MINOR_UNIT,
        busy_timeout: float = 5.0,
        create: bool = True,
        max_posting: Decimal = rules.DEFAULT_MAX_POSTING,
    ) -> SqliteLedger:
        """Open (creating or migrating) the ledger at ``path``.

        ``minor_unit`` applies only when the file is created; an existing store
        keeps the unit recorded in its meta table. With ``create=False`` a
        missing file, or one without callgate's tables, is a :class:`LedgerError`
        and nothing is written.
        """
        path = Path(path)
        if not create and not path.exists():
            raise LedgerError(
                f"no ledger at {path}: the file does not exist (create one with "
                "`callgate ledger init`, or check --ledger / CALLGATE_LEDGER / agent.yaml)"
            )
        if not path.parent.is_dir():
            raise LedgerUnavailable(f"ledger directory {path.parent} does not exist")
        worker = _Worker(path, busy_timeout, create=create)
        worker.start()
        try:
            unit, created = await worker.submit(
                lambda conn: migrate(conn, path, minor_unit, create), write=True
            )
        except BaseException:
            worker.jobs.put(None)
            raise
        return cls(path, unit, worker, max_posting=max_posting, created=created)

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(sqlite3.Error):  # ProgrammingError: another thread's
                reader.close()
        if not self._worker.is_alive():
            return
        self._worker.jobs.put(None)
        await asyncio.to_thread(self._worker.join)

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *,
                     abandonable: bool = False) -> T:
        if not self._worker.is_alive():
            raise LedgerUnavailable(f"ledger {self.path} is closed")
        return await self._worker.submit(fn, write=True, abandonable=abandonable)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._worker.is_alive():
            raise LedgerUnavailable(f"ledger {self.path} is closed")
        return await self._worker.submit(fn, write=False)

    async def _point_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read of a few indexed rows: on this thread's reader, else on the worker.

        ``fn`` must fetch everything it reads (``fetchone``/``fetchall``), so
        that no read transaction stays open to hold back the WAL checkpoint.
        """
        reader = self._reader
        if reader is not None and threading.get_ident() == self._reader_thread:
            if not self._worker.is_alive():
                raise LedgerUnavailable(f"ledger {self.path} is closed")
            try:
                return fn(reader)
            except sqlite3.DatabaseError:
                pass  # busy (recovery, a truncating checkpoint) or worse: the worker's turn
        return await self._read(fn)

    # -- finance --------------------------------------------------------------
    async def _finance(
        self, kind: PostingKind, account: str, units: int | None, ref: str, at: datetime,
        note: str, first_minimum: int = 0, operator: str = "",
    ) -> Posting:
        rules.check_ref(ref)
        when = rules.to_micros(at)
        key = rules.finance_key(kind, ref)
        unit = self.unit

        def run(conn: sqlite3.Connection) -> Posting:
            row = conn.execute(
                "SELECT * FROM postings WHERE account = ? AND key = ?", (account, key)
            ).fetchone()
            if row is not None:
                if rules.finance_replay_matches(kind, row["amount"], row["note"], units, note):
                    return _posting(row, unit)
                raise rules.finance_conflict(kind, account, ref, row["amount"], unit)
            acc = conn.execute(
                "SELECT posted, held, closed FROM accounts WHERE id = ?", (account,)
            ).fetchone()
            posted, held, closed = (0, 0, False) if acc is None else (
                acc["posted"], acc["held"], bool(acc["closed"]))
            if acc is None:
                if kind is not PostingKind.TOPUP:
                    raise UnknownAccount(f"the ledger has no account {account!r}")
                assert units is not None
                rules.first_topup_check(account, units, first_minimum, unit)
                conn.execute(
                    "INSERT INTO accounts (id, created_at) VALUES (?, ?)", (account, when)
                )
            closed_after = rules.lifecycle(account, kind, closed)
            amount = units
            if kind is PostingKind.REFUND:
                (live,) = conn.execute(
                    "SELECT count(*) FROM calls WHERE account = ? AND status != 'ended'",
                    (account,),
                ).fetchone()
                amount = rules.refund_units(account, posted, held, live, unit)
            assert amount is not None
            delta = rules.posted_delta(kind, amount)
            rules.check_total(account, posted + delta, unit)
            conn.execute(
                "UPDATE accounts SET posted = posted + ?, closed = ? WHERE id = ?",
                (delta, closed_after, account),
            )
            cur = conn.execute(
                "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (account, kind.value, amount, when, ref, key, note, operator),
            )
            return _posting(cur.fetchone(), unit)

        return await self._write(run)

    async def balance(self, account: str) -> Balance:
        unit = self.unit

        def run(conn: sqlite3.Connection) -> Balance:
            row = conn.execute("SELECT * FROM accounts WHERE id = ?", (account,)).fetchone()
            if row is None:
                raise UnknownAccount(f"the ledger has no account {account!r}")
            return _balance(row, unit)

        return await self._point_read(run)

    async def balances(self) -> list[Balance]:
        unit = self.unit
        return await self._read(
            lambda conn: [
                _balance(r, unit) for r in conn.execute("SELECT * FROM accounts ORDER BY id")
            ]
        )

    async def history(self, account: str, since: datetime | None = None) -> list[Posting]:
        start = rules.to_micros(since) if since is not None else None
        unit = self.unit

        def run(conn: sqlite3.Connection) -> list[Posting]:
            if conn.execute("SELECT 1 FROM accounts WHERE id = ?", (account,)).fetchone() is None:
                raise UnknownAccount(f"the ledger has no account {account!r}")
            rows = conn.execute(
                "SELECT * FROM postings WHERE account = ? AND (? IS NULL OR at >= ?) ORDER BY id",
                (account, start, start),
            )
            return [_posting(r, unit) for r in rows]

        return await self._read(run)

    # -- calls ----------------------------------------------------------------
    async def admit_call(self, call: CallRecord, max_live: int | None) -> bool:
        return await self._write(self._admit_job(call, max_live))

    def _admit_job(
        self, call: CallRecord, max_live: int | None
    ) -> Callable[[sqlite3.Connection], bool]:
        rate = rules.to_units(call.rate, self.unit, what="rate")
        admitted = rules.to_micros(call.admitted_at)
        answered = rules.to_micros(call.answered_at) if call.answered_at else None

        def run(conn: sqlite3.Connection) -> bool:
            acc = conn.execute(
                "SELECT closed FROM accounts WHERE id = ?", (call.account,)
            ).fetchone()
            if acc is None:
                raise UnknownAccount(f"the ledger has no account {call.account!r}")
            existing = conn.execute(
                "SELECT account, status FROM calls WHERE call_id = ?", (call.call_id,)
            ).fetchone()
            if existing is not None:
                return rules.readmit(call, existing["account"], existing["status"])
            if acc["closed"]:
                raise rules.closed_error(call.account)
            if max_live is not None:
                (live,) = conn.execute(
                    "SELECT count(*) FROM calls WHERE account = ? AND status != 'ended'",
                    (call.account,),
                ).fetchone()
                if live >= max_live:
                    return False
            conn.execute(
                "INSERT INTO calls (call_id, account, node, caller, callee, tariff_name, rate,"
                " increment, minimum, admitted_at, answered_at, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    call.call_id, call.account, call.node, call.caller, call.callee,
                    call.tariff_name, rate, call.increment, call.minimum, admitted, answered,
                    (CallStatus.ANSWERED if answered is not None else CallStatus.ADMITTED).value,
                ),
            )
            return True

        return run

    async def answer_call(self, call_id: str, answered_at: datetime) -> CallRecord:
        when = rules.to_micros(answered_at)
        unit = self.unit

        def run(conn: sqlite3.Connection) -> CallRecord:
            conn.execute(
                "UPDATE calls SET status = 'answered', answered_at = ?"
                " WHERE call_id = ? AND status = 'admitted'",
                (when, call_id),
            )
            row = conn.execute("SELECT * FROM calls WHERE call_id = ?", (call_id,)).fetchone()
            if row is None:
                raise rules.unknown_call(call_id)
            return _call(row, unit)

        return await self._write(run)

    async def hold(
        self, call_id: str, step: int, amount: Decimal, paid_seconds: int, at: datetime
    ) -> bool:
        return await self._write(self._hold_job(call_id, step, amount, paid_seconds, at))

    def _hold_job(
        self, call_id: str, step: int, amount: Decimal, paid_seconds: int, at: datetime
    ) -> Callable[[sqlite3.Connection], bool]:
        units = rules.positive_units(amount, self.unit, what="hold")
        when = rules.to_micros(at)
        key = rules.hold_key(call_id, step)
        unit = self.unit

        def run(conn: sqlite3.Connection) -> bool:
            call = conn.execute(
                "SELECT account, status FROM calls WHERE call_id = ?", (call_id,)
            ).fetchone()
            if call is None:
                raise rules.unknown_call(call_id)
            account = call["account"]
            done = conn.execute(
                "SELECT amount FROM postings WHERE account = ? AND key = ?", (account, key)
            ).fetchone()
            if done is not None:
                if done["amount"] != units:
                    raise IdempotencyConflict(
                        f"step {step} of call {call_id!r} was already held for "
                        f"{rules.show(done['amount'], unit)}, not {rules.show(units, unit)}"
                    )
                return True
            if call["status"] == CallStatus.ENDED:
                raise RefusedOperation(f"call {call_id!r} has already been settled")
            # The conditional update is the atomic check: under BEGIN IMMEDIATE no
            # other writer runs between reading the balance and raising the hold.
            cur = conn.execute(
                "UPDATE accounts SET held = held + ?"
                " WHERE id = ? AND NOT closed AND posted - held >= ?",
                (units, account, units),
            )
            if cur.rowcount == 0:
                closed = conn.execute(
                    "SELECT closed FROM accounts WHERE id = ?", (account,)
                ).fetchone()["closed"]
                if closed:
                    raise rules.closed_error(account)
                return False
            conn.execute(
                "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                " VALUES (?, 'hold', ?, ?, ?, ?, ?)",
                (account, units, when, call_id, key, call_id),
            )
            conn.execute(
                "UPDATE calls SET held = held + ?, paid_seconds = max(paid_seconds, ?),"
                " steps = steps + 1 WHERE call_id = ?",
                (units, paid_seconds, call_id),
            )
            return True

        return run

    async def settle_call(self, cdr: Cdr) -> Cdr:
        fingerprint = rules.cdr_fingerprint(cdr)
        amount = rules.to_units(cdr.amount, self.unit, what="call amount")
        ended = rules.to_micros(cdr.ended_at)
        answered = rules.to_micros(cdr.answered_at) if cdr.answered_at else None
        unit = self.unit

        def run(conn: sqlite3.Connection) -> Cdr:
            call = conn.execute(
                "SELECT account, held, EXISTS (SELECT 1 FROM cdrs WHERE call_id = ?1) AS settled"
                " FROM calls WHERE call_id = ?1", (cdr.call_id,)
            ).fetchone()
            if call is None:
                raise rules.unknown_call(cdr.call_id)
            if call["settled"]:
                stored = conn.execute(
                    "SELECT * FROM cdrs WHERE call_id = ?", (cdr.call_id,)
                ).fetchone()
                if stored["submitted"] == fingerprint:
                    return _cdr(stored, unit)
                raise rules.settle_conflict(cdr.call_id)
            account = call["account"]
            if cdr.account != account:
                raise RefusedOperation(
                    f"call {cdr.call_id!r} belongs to account {account!r}, not {cdr.account!r}"
                )
            plan = rules.settle_plan(call["held"], amount)
            for kind, units, key in (
                (PostingKind.CHARGE, plan.charge, rules.charge_key(cdr.call_id)),
                (PostingKind.RELEASE, plan.release, rules.release_key(cdr.call_id)),
            ):
                if units:
                    conn.execute(
                        "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (account, kind.value, units, ended, cdr.call_id, key, cdr.call_id),
                    )
            conn.execute(
                "UPDATE accounts SET posted = posted - ?, held = held - ? WHERE id = ?",
                (plan.charge, plan.charge + plan.release, account),
            )
            conn.execute(
                "UPDATE calls SET held = 0, status = 'ended', ended_at = ? WHERE call_id = ?",
                (ended, cdr.call_id),
            )
            flags = (*cdr.flags, "capped") if plan.capped else cdr.flags
            row = conn.execute(
                "INSERT INTO cdrs (call_id, account, caller, callee, answered_at, ended_at,"
                " billsec, billed_seconds, amount, cause, cut_off, flags, node, submitted)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (
                    cdr.call_id, account, cdr.caller, cdr.callee, answered, ended, cdr.billsec,
                    cdr.billed_seconds, plan.charge, cdr.cause, cdr.cut_off,
                    json.dumps(list(flags)), cdr.node, fingerprint,
                ),
            ).fetchone()
            return _cdr(row, unit)

        return await self._write(run)

    async def get_call(self, call_id: str) -> CallRecord | None:
        unit = self.unit

        def run(conn: sqlite3.Connection) -> CallRecord | None:
            row = conn.execute("SELECT * FROM calls WHERE call_id = ?", (call_id,)).fetchone()
            return None if row is None else _call(row, unit)

        return await self._point_read(run)

    async def live_calls(self, account: str | None = None) -> list[CallRecord]:
        unit = self.unit

        def run(conn: sqlite3.Connection) -> list[CallRecord]:
            rows = conn.execute(
                "SELECT * FROM calls WHERE status != 'ended' AND (? IS NULL OR account = ?)"
                " ORDER BY admitted_at, call_id",
                (account, account),
            )
            return [_call(r, unit) for r in rows]

        return await self._read(run)

    async def cdrs(self, account: str, start: datetime, end: datetime) -> list[Cdr]:
        lo, hi = rules.to_micros(start), rules.to_micros(end)
        unit = self.unit

        def run(conn: sqlite3.Connection) -> list[Cdr]:
            rows = conn.execute(
                "SELECT * FROM cdrs WHERE account = ? AND ended_at >= ? AND ended_at < ?"
                " ORDER BY ended_at, call_id",
                (account, lo, hi),
            )
            return [_cdr(r, unit) for r in rows]

        return await self._read(run)

    # -- corrections from the PBX's own CDR ------------------------------------
    async def call_cdr(self, call_id: str) -> Cdr | None:
        unit = self.unit

        def run(conn: sqlite3.Connection) -> Cdr | None:
            row = conn.execute("SELECT * FROM cdrs WHERE call_id = ?", (call_id,)).fetchone()
            return None if row is None else _cdr(row, unit)

        return await self._point_read(run)

    async def correct_call(self, call_id: str, pbx_billsec: int, *, note: str = "",
                           operator: str = "") -> Cdr:
        unit = self.unit

        def run(conn: sqlite3.Connection) -> Cdr:
            call = conn.execute(
                "SELECT account, rate, increment, minimum FROM calls WHERE call_id = ?",
                (call_id,)).fetchone()
            if call is None:
                raise rules.unknown_call(call_id)
            cdr = conn.execute("SELECT * FROM cdrs WHERE call_id = ?", (call_id,)).fetchone()
            if cdr is None:
                raise rules.not_settled(call_id)
            if cdr["pbx_billsec"] is not None:
                if cdr["pbx_billsec"] == pbx_billsec:
                    return _cdr(cdr, unit)
                raise rules.correction_conflict(call_id, cdr["pbx_billsec"], pbx_billsec)
            delta = rules.correction_units(cdr["amount"], call["rate"], call["increment"],
                                           call["minimum"], pbx_billsec, unit,
                                           call_id=call_id, max_posting=self.max_posting)
            if delta:
                acc = conn.execute("SELECT posted, closed FROM accounts WHERE id = ?",
                                   (call["account"],)).fetchone()
                if acc["closed"]:
                    raise rules.closed_correction_error(call["account"], call_id)
                rules.check_total(call["account"], acc["posted"] - delta, unit)
                conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, call_id, note,"
                    " operator) VALUES (?, 'correction', ?, ?, ?, ?, ?, ?, ?)",
                    (call["account"], delta, cdr["ended_at"], call_id,
                     rules.correction_key(call_id), call_id, note, operator),
                )
                conn.execute("UPDATE accounts SET posted = posted - ? WHERE id = ?",
                             (delta, call["account"]))
            row = conn.execute(
                "UPDATE cdrs SET pbx_billsec = ?, correction = ? WHERE call_id = ? RETURNING *",
                (pbx_billsec, delta, call_id)).fetchone()
            return _cdr(row, unit)

        return await self._write(run)

    # -- attempts -------------------------------------------------------------
    async def record_attempt(
        self, account: str, destination: str, at: datetime, allowed: bool, reason: str,
        caller: str = "",
    ) -> None:
        await self._write(self._attempt_job(account, destination, at, allowed, reason, caller))

    @staticmethod
    def _attempt_job(
        account: str, destination: str, at: datetime, allowed: bool, reason: str,
        caller: str = "",
    ) -> Callable[[sqlite3.Connection], None]:
        when = rules.to_micros(at)

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO attempts (account, destination, at, allowed, reason, caller)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (account, destination, when, allowed, reason, caller),
            )

        return run

    # -- the gate: one read and one write per decision -------------------------
    async def account_state(
        self, account: str, *, account_since: datetime | None = None,
        callee_since: datetime | None = None, destination: str | None = None,
        cps_since: datetime | None = None, caller: str | None = None,
        caller_hour_since: datetime | None = None, caller_day_since: datetime | None = None,
    ) -> AccountSnapshot:
        unit = self.unit
        a_since = rules.to_micros(account_since) if account_since else None
        c_since = rules.to_micros(callee_since) if callee_since else None
        s_since = rules.to_micros(cps_since) if cps_since else None
        h_since = rules.to_micros(caller_hour_since) if caller_hour_since else None
        d_since = rules.to_micros(caller_day_since) if caller_day_since else None

        def run(conn: sqlite3.Connection) -> AccountSnapshot:
            acc = conn.execute(
                "SELECT posted, held, closed FROM accounts WHERE id = ?", (account,)
            ).fetchone()
            (live,) = conn.execute(
                "SELECT count(*) FROM calls WHERE account = ? AND status != 'ended'", (account,)
            ).fetchone()
            account_attempts = callee_attempts = 0
            if a_since is not None:
                (account_attempts,) = conn.execute(
                    "SELECT count(*) FROM attempts WHERE account = ? AND at >= ? AND allowed",
                    (account, a_since)).fetchone()
            if c_since is not None and destination is not None:
                (callee_attempts,) = conn.execute(
                    "SELECT count(*) FROM attempts WHERE account = ? AND destination = ?"
                    " AND at >= ? AND allowed", (account, destination, c_since)).fetchone()
            extra = _compliance_counts(conn, account, s_since, caller, h_since, d_since)
            if acc is None:
                return AccountSnapshot(Decimal(0), False, live, account_attempts,
                                       callee_attempts, False, *extra)
            available = rules.from_units(acc["posted"] - acc["held"], unit)
            return AccountSnapshot(available, bool(acc["closed"]), live, account_attempts,
                                   callee_attempts, True, *extra)

        return await self._point_read(run)

    async def admit_and_hold(
        self, call: CallRecord, max_live: int | None, amount: Decimal, paid_seconds: int,
        *, reason: str, caller_key: str | None = None,
    ) -> Admission:
        admit = self._admit_job(call, max_live)
        hold = self._hold_job(call.call_id, 1, amount, paid_seconds, call.admitted_at)
        caller = call.caller if caller_key is None else caller_key

        units = rules.positive_units(amount, self.unit, what="hold")
        rate = rules.to_units(call.rate, self.unit, what="rate")
        admitted = rules.to_micros(call.admitted_at)
        key = rules.hold_key(call.call_id, 1)

        def attempt(allowed: bool, why: str) -> Callable[[sqlite3.Connection], None]:
            return self._attempt_job(call.account, call.callee, call.admitted_at, allowed, why,
                                     caller)

        def fresh(conn: sqlite3.Connection) -> Admission | None:
            """The usual case, a new call on an open account, in six statements.

            None: the careful path below (unknown or closed account, a replay of a
            call already known, a call recorded as answered) decides and says why.
            Under BEGIN IMMEDIATE no other writer runs between these statements.
            """
            row = conn.execute(
                "SELECT closed,"
                " (SELECT count(*) FROM calls WHERE account = ?1 AND status != 'ended'),"
                " EXISTS (SELECT 1 FROM calls WHERE call_id = ?2)"
                " FROM accounts WHERE id = ?1", (call.account, call.call_id),
            ).fetchone()
            if row is None or row[0] or row[2] or call.answered_at is not None:
                return None
            if max_live is not None and row[1] >= max_live:
                attempt(False, "concurrency_limit")(conn)
                return Admission.LINES_BUSY
            # The conditional update is the balance check.
            if conn.execute(
                "UPDATE accounts SET held = held + ? WHERE id = ? AND posted - held >= ?",
                (units, call.account, units),
            ).rowcount == 0:
                attempt(False, "insufficient_balance")(conn)
                return Admission.NO_FUNDS
            conn.execute(
                "INSERT INTO calls (call_id, account, node, caller, callee, tariff_name, rate,"
                " increment, minimum, admitted_at, status, held, paid_seconds, steps)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'admitted', ?, ?, 1)",
                (call.call_id, call.account, call.node, call.caller, call.callee,
                 call.tariff_name, rate, call.increment, call.minimum, admitted, units,
                 paid_seconds),
            )
            conn.execute(
                "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                " VALUES (?, 'hold', ?, ?, ?, ?, ?)",
                (call.account, units, admitted, call.call_id, key, call.call_id),
            )
            attempt(True, reason)(conn)
            return Admission.ADMITTED

        def run(conn: sqlite3.Connection) -> Admission:
            quick = fresh(conn)
            if quick is not None:
                return quick
            if not admit(conn):
                attempt(False, "concurrency_limit")(conn)
                return Admission.LINES_BUSY
            if not hold(conn):
                # Nothing was written for the call but its row: take that back too.
                conn.execute("DELETE FROM calls WHERE call_id = ? AND held = 0 AND steps = 0",
                             (call.call_id,))
                attempt(False, "insufficient_balance")(conn)
                return Admission.NO_FUNDS
            attempt(True, reason)(conn)
            return Admission.ADMITTED

        # The gate's budget bounds this wait: an admission nobody awaits any more is
        # not worth running (the call was refused meanwhile).
        return await self._write(run, abandonable=True)

    async def attempts(
        self, account: str, since: datetime, destination: str | None = None
    ) -> list[datetime]:
        start = rules.to_micros(since)

        def run(conn: sqlite3.Connection) -> list[datetime]:
            rows = conn.execute(
                "SELECT at FROM attempts WHERE account = ? AND at >= ? AND allowed"
                " AND (? IS NULL OR destination = ?) ORDER BY at",
                (account, start, destination, destination),
            )
            return [rules.from_micros(r[0]) for r in rows]

        return await self._read(run)

    async def prune_attempts(self, before: datetime) -> int:
        cutoff = rules.to_micros(before)
        return await self._write(
            lambda conn: conn.execute("DELETE FROM attempts WHERE at < ?", (cutoff,)).rowcount
        )

    # -- consistency ----------------------------------------------------------
    async def audit(self) -> list[str]:
        unit = self.unit

        def run(conn: sqlite3.Connection) -> list[str]:
            # One read transaction: a consistent snapshot even while others write.
            conn.execute("BEGIN")
            try:
                accounts = [
                    rules.StoredAccount(r["id"], r["posted"], r["held"], bool(r["closed"]))
                    for r in conn.execute("SELECT id, posted, held, closed FROM accounts")
                ]
                account_sums = {
                    (r[0], r[1]): r[2]
                    for r in conn.execute(
                        "SELECT account, kind, sum(amount) FROM postings GROUP BY account, kind"
                    )
                }
                calls = [
                    rules.StoredCall(r[0], r[1], r[2] == "ended", r[3], r[4], r[5] or 0)
                    for r in conn.execute(
                        "SELECT c.call_id, c.account, c.status, c.held, d.amount, d.correction"
                        " FROM calls c LEFT JOIN cdrs d ON d.call_id = c.call_id"
                    )
                ]
                call_sums = {
                    (r[0], r[1]): r[2]
                    for r in conn.execute(
                        "SELECT call_id, kind, sum(amount) FROM postings"
                        " WHERE call_id IS NOT NULL GROUP BY call_id, kind"
                    )
                }
            finally:
                conn.execute("COMMIT")
            return rules.audit(accounts, account_sums, calls, call_sums, unit)

        return await self._read(run)

