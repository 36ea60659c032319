"""The SQLite ledger's compliance storage: complaints, live DNC, suspensions.

A mixin of :class:`~agent.ledger.sqlite.SqliteLedger` (its ``_write``,
``_read``, ``_point_read`` and ``unit``); the rules are in
:mod:`agent.ledger.compliance`. Each operation is one job of the ledger's
writer thread, so it is one ``BEGIN IMMEDIATE`` transaction: a complaint, its
fine, its DNC entry and any suspension commit together or not at all, and
the DNC change log's ``seq`` is in commit order (one writer).
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from agent.ledger import _rules as rules
from agent.ledger import compliance as c
from agent.ledger.model import PostingKind, RefusedOperation, UnknownAccount

T = TypeVar("T")


def _complaint(row: sqlite3.Row, unit: Decimal) -> c.Complaint:
    return c.Complaint(
        ticket=row["ticket"], account=row["account"], callee=row["callee"],
        at=rules.from_micros(row["at"]), fine=rules.from_units(row["fine"], unit),
        operator=row["operator"], note=row["note"],
        recorded_at=rules.from_micros(row["recorded_at"]),
        withdrawn_at=None if row["withdrawn_at"] is None
        else rules.from_micros(row["withdrawn_at"]),
        withdrawn_by=row["withdrawn_by"], withdraw_note=row["withdraw_note"],
    )


def _entry(row: sqlite3.Row) -> c.DncEntry:
    return c.DncEntry(row["account"], row["number"], row["reason"], row["operator"],
                      rules.from_micros(row["added_at"]), row["seq"])


def _suspension(row: sqlite3.Row) -> c.Suspension:
    return c.Suspension(row["account"], row["reason"], row["operator"],
                        rules.from_micros(row["at"]))


def dnc_add_job(conn: sqlite3.Connection, account: str, number: str, reason: str,
                operator: str, when: int) -> tuple[c.DncEntry, bool]:
    row = conn.execute("SELECT * FROM dnc WHERE account = ? AND number = ?",
                       (account, number)).fetchone()
    if row is not None:
        return _entry(row), False
    seq = conn.execute(
        "INSERT INTO dnc_log (account, number, added, reason, operator, at)"
        " VALUES (?, ?, 1, ?, ?, ?) RETURNING seq",
        (account, number, reason, operator, when)).fetchone()[0]
    row = conn.execute(
        "INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
        (account, number, reason, operator, when, seq)).fetchone()
    return _entry(row), True


def _log_account(conn: sqlite3.Connection, account: str, action: str, reason: str,
                 operator: str, when: int) -> None:
    conn.execute("INSERT INTO account_log (account, action, reason, operator, at)"
                 " VALUES (?, ?, ?, ?, ?)", (account, action, reason, operator, when))


class SqliteCompliance:
    unit: Decimal

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *,
                     abandonable: bool = False) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _point_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    # -- complaints -------------------------------------------------------------
    async def add_complaint(
        self, *, account: str, callee: str, ticket: str, at: datetime, fine: Decimal,
        operator: str, note: str = "", recorded_at: datetime,
        suspend: c.SuspendRule | None = None,
    ) -> c.ComplaintOutcome:
        c.check_ticket(ticket)
        c.check_note(note)
        rules.check_operator(c.check_text(operator, "an operator"))
        c.check_number(callee)
        when = rules.to_micros(at)
        at_utc = rules.check_time(at)
        recorded = rules.to_micros(recorded_at)
        units = rules.to_units(fine, self.unit, what="complaint fine")
        if units < 0:
            raise RefusedOperation("a complaint fine must not be negative")
        unit = self.unit
        ref = c.penalty_ref(ticket)
        key = rules.finance_key(PostingKind.PENALTY, ref)

        def run(conn: sqlite3.Connection) -> c.ComplaintOutcome:
            row = conn.execute("SELECT * FROM complaints WHERE ticket = ?",
                               (ticket,)).fetchone()
            if row is not None:
                stored = _complaint(row, unit)
                c.complaint_replay(stored, account, callee, at_utc, note)
                return c.ComplaintOutcome(stored, created=False)
            if units and conn.execute("SELECT 1 FROM accounts WHERE id = ?",
                                      (account,)).fetchone() is None:
                raise UnknownAccount(f"the ledger has no account {account!r} to fine")
            row = conn.execute(
                "INSERT INTO complaints (ticket, account, callee, at, fine, operator, note,"
                " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (ticket, account, callee, when, units, operator, note, recorded)).fetchone()
            if units and conn.execute("SELECT 1 FROM postings WHERE account = ? AND key = ?",
                                      (account, key)).fetchone() is None:
                conn.execute("UPDATE accounts SET posted = posted - ? WHERE id = ?",
                             (units, account))
                conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
                    " VALUES (?, 'penalty', ?, ?, ?, ?, ?, ?)",
                    (account, units, when, ref, key, f"complaint {ticket}", operator))
            dnc_add_job(conn, account, callee, f"complaint {ticket}", operator, when)
            count, suspended = 0, False
            if suspend is not None:
                since = rules.to_micros(at_utc - suspend.period)
                (count,) = conn.execute(
                    "SELECT count(*) FROM complaints WHERE account = ? AND at > ? AND at <= ?"
                    " AND withdrawn_at IS NULL", (account, since, when)).fetchone()
                already = conn.execute("SELECT 1 FROM suspensions WHERE account = ?",
                                       (account,)).fetchone()
                if suspend.due(count) and already is None:
                    why = suspend.describe(count)
                    conn.execute("INSERT INTO suspensions (account, reason, operator, at)"
                                 " VALUES (?, ?, ?, ?)", (account, why, operator, recorded))
                    _log_account(conn, account, "suspend", why, operator, recorded)
                    suspended = True
            return c.ComplaintOutcome(_complaint(row, unit), True, count, suspended)

        return await self._write(run)

    async def withdraw_complaint(
        self, ticket: str, *, operator: str, at: datetime, note: str = ""
    ) -> tuple[c.Complaint, bool]:
        c.check_note(note)
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.to_micros(at)
        unit = self.unit
        ref = c.reversal_ref(ticket)
        key = rules.finance_key(PostingKind.ADJUSTMENT, ref)

        def run(conn: sqlite3.Connection) -> tuple[c.Complaint, bool]:
            row = conn.execute("SELECT * FROM complaints WHERE ticket = ?",
                               (ticket,)).fetchone()
            if row is None:
                raise RefusedOperation(f"the ledger has no complaint {ticket!r}")
            if row["withdrawn_at"] is not None:
                return _complaint(row, unit), False
            account, units = row["account"], row["fine"]
            if units and conn.execute("SELECT 1 FROM postings WHERE account = ? AND key = ?",
                                      (account, key)).fetchone() is None:
                conn.execute("UPDATE accounts SET posted = posted + ? WHERE id = ?",
                             (units, account))
                conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
                    " VALUES (?, 'adjustment', ?, ?, ?, ?, ?, ?)",
                    (account, units, when, ref, key, f"complaint {ticket} withdrawn", operator))
            row = conn.execute(
                "UPDATE complaints SET withdrawn_at = ?, withdrawn_by = ?, withdraw_note = ?"
                " WHERE ticket = ? RETURNING *", (when, operator, note, ticket)).fetchone()
            return _complaint(row, unit), True

        return await self._write(run)

    async def complaints(
        self, account: str | None = None, start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[c.Complaint]:
        lo = rules.to_micros(start) if start is not None else None
        hi = rules.to_micros(end) if end is not None else None
        unit = self.unit

        def run(conn: sqlite3.Connection) -> list[c.Complaint]:
            rows = conn.execute(
                "SELECT * FROM complaints WHERE (?1 IS NULL OR account = ?1)"
                " AND (?2 IS NULL OR at >= ?2) AND (?3 IS NULL OR at < ?3)"
                " ORDER BY at, ticket", (account, lo, hi))
            return [_complaint(r, unit) for r in rows]

        return await self._read(run)

    async def complaint(self, ticket: str) -> c.Complaint | None:
        unit = self.unit

        def run(conn: sqlite3.Connection) -> c.Complaint | None:
            row = conn.execute("SELECT * FROM complaints WHERE ticket = ?",
                               (ticket,)).fetchone()
            return None if row is None else _complaint(row, unit)

        return await self._read(run)

    # -- suspension -------------------------------------------------------------
    async def suspend(
        self, account: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[c.Suspension, bool]:
        c.check_text(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.to_micros(at)

        def run(conn: sqlite3.Connection) -> tuple[c.Suspension, bool]:
            row = conn.execute("SELECT * FROM suspensions WHERE account = ?",
                               (account,)).fetchone()
            if row is not None:
                return _suspension(row), False
            row = conn.execute("INSERT INTO suspensions (account, reason, operator, at)"
                               " VALUES (?, ?, ?, ?) RETURNING *",
                               (account, reason, operator, when)).fetchone()
            _log_account(conn, account, "suspend", reason, operator, when)
            return _suspension(row), True

        return await self._write(run)

    async def resume(
        self, account: str, *, operator: str, at: datetime, note: str = ""
    ) -> bool:
        c.check_note(note)
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.to_micros(at)

        def run(conn: sqlite3.Connection) -> bool:
            if conn.execute("DELETE FROM suspensions WHERE account = ?",
                            (account,)).rowcount == 0:
                return False
            _log_account(conn, account, "resume", note, operator, when)
            return True

        return await self._write(run)

    async def suspension(self, account: str) -> c.Suspension | None:
        def run(conn: sqlite3.Connection) -> c.Suspension | None:
            row = conn.execute("SELECT * FROM suspensions WHERE account = ?",
                               (account,)).fetchone()
            return None if row is None else _suspension(row)

        return await self._point_read(run)

    async def account_events(self, account: str) -> list[c.AccountEvent]:
        def run(conn: sqlite3.Connection) -> list[c.AccountEvent]:
            rows = conn.execute("SELECT * FROM account_log WHERE account = ? ORDER BY id",
                                (account,))
            return [c.AccountEvent(r["account"], r["action"], r["reason"], r["operator"],
                                   rules.from_micros(r["at"])) for r in rows]

        return await self._read(run)

    # -- live do-not-call ---------------------------------------------------------
    async def dnc_add(
        self, account: str, number: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[c.DncEntry, bool]:
        c.check_number(number)
        c.check_text(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.to_micros(at)
        return await self._write(
            lambda conn: dnc_add_job(conn, account, number, reason, operator, when))

    async def dnc_remove(
        self, account: str, number: str, *, operator: str, at: datetime, reason: str = ""
    ) -> bool:
        c.check_note(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.to_micros(at)

        def run(conn: sqlite3.Connection) -> bool:
            if conn.execute("DELETE FROM dnc WHERE account = ? AND number = ?",
                            (account, number)).rowcount == 0:
                return False
            conn.execute("INSERT INTO dnc_log (account, number, added, reason, operator, at)"
                         " VALUES (?, ?, 0, ?, ?, ?)", (account, number, reason, operator, when))
            return True

        return await self._write(run)

    async def dnc_list(self, account: str | None = None) -> list[c.DncEntry]:
        def run(conn: sqlite3.Connection) -> list[c.DncEntry]:
            rows = conn.execute("SELECT * FROM dnc WHERE (?1 IS NULL OR account = ?1)"
                                " ORDER BY account, number", (account,))
            return [_entry(r) for r in rows]

        return await self._read(run)

    async def dnc_lookup(self, account: str, number: str) -> list[c.DncEntry]:
        def run(conn: sqlite3.Connection) -> list[c.DncEntry]:
            rows = conn.execute("SELECT * FROM dnc WHERE account IN (?, '') AND number = ?"
                                " ORDER BY account", (account, number)).fetchall()
            return [_entry(r) for r in rows]

        return await self._point_read(run)

    async def dnc_snapshot(self) -> tuple[int, dict[str, array[int]]]:
        def run(conn: sqlite3.Connection) -> tuple[int, dict[str, array[int]]]:
            conn.execute("BEGIN")  # one read transaction: the entries and seq agree
            try:
                (seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM dnc_log").fetchone()
                out: dict[str, array[int]] = {}
                accounts = [r[0] for r in conn.execute("SELECT DISTINCT account FROM dnc")]
                for account in accounts:
                    cursor = conn.execute("SELECT '1' || number FROM dnc WHERE account = ?",
                                          (account,))
                    cursor.row_factory = None  # plain tuples: faster
                    out[account] = array("Q", [int(row[0]) for row in cursor])
            finally:
                conn.execute("COMMIT")
            return int(seq), out

        return await self._read(run)

    async def dnc_changes(self, after: int, limit: int = 10_000) -> list[c.DncChange]:
        def run(conn: sqlite3.Connection) -> list[c.DncChange]:
            rows = conn.execute("SELECT seq, account, number, added FROM dnc_log"
                                " WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)).fetchall()
            return [c.DncChange(r[0], r[1], r[2], bool(r[3])) for r in rows]

        return await self._point_read(run)


