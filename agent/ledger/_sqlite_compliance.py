"""The SQLite ledger's compliance storage: complaints, live DNC, suspensions (only SQL).

A mixin of :class:`~agent.ledger.sqlite.SqliteLedger` (its ``_write``,
``_read``, ``_point_read`` and ``unit``). What a write does and decides is
:mod:`agent.ledger._compliance_rules`; here is :class:`SqliteStore`, one SQL
statement a step, and the reads. A write's plan runs as one job of the
ledger's writer thread, so it is one ``BEGIN IMMEDIATE`` transaction: a
complaint, its fine, its DNC entry and any suspension commit together or not
at all, and the DNC change log's ``seq`` is in commit order (one writer).
Times are kept as integer microseconds (:func:`agent.ledger._rules.to_micros`).
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from agent.ledger import _compliance_rules as plans
from agent.ledger import _rules as rules
from agent.ledger import compliance as c
from agent.ledger.model import PostingKind

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


def _keys(conn: sqlite3.Connection, account: str) -> array[int]:
    """One account's entries as keys. As bytes, because ``int()`` of a str reads
    Arabic-Indic digits ('١٢٣') as another number where bytes refuse anything but
    ASCII; a row from before the ledger checked its digits sends the load down a
    second query that leaves such rows out (filtering every load costs ~30 %)."""
    query = "SELECT CAST('1' || number AS BLOB) FROM dnc WHERE account = ?"
    for sql in (query, query + " AND number NOT GLOB '*[^0-9]*'"):
        cursor = conn.execute(sql, (account,))
        cursor.row_factory = None  # plain tuples: faster
        try:
            return array("Q", [int(row[0]) for row in cursor])
        except ValueError:
            continue
    raise AssertionError("unreachable: the second query keeps only ASCII digits")


class SqliteStore:
    """:class:`agent.ledger._compliance_rules.Store` on one connection in a transaction."""

    def __init__(self, conn: sqlite3.Connection, unit: Decimal) -> None:
        self.conn, self.unit = conn, unit

    def _one(self, sql: str, *args: object) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, args).fetchone()
        return row

    def lock_dnc(self) -> None:
        return None  # BEGIN IMMEDIATE: the writer is alone already

    def complaint(self, ticket: str, *, for_update: bool = False) -> c.Complaint | None:
        row = self._one("SELECT * FROM complaints WHERE ticket = ?", ticket)
        return None if row is None else _complaint(row, self.unit)

    def account_closed(self, account: str) -> bool | None:
        row = self._one("SELECT closed FROM accounts WHERE id = ?", account)
        return None if row is None else bool(row["closed"])

    def insert_complaint(self, new: plans.NewComplaint) -> c.Complaint:
        row = self._one(
            "INSERT INTO complaints (ticket, account, callee, at, fine, operator, note,"
            " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
            new.ticket, new.account, new.callee, rules.to_micros(new.at), new.units,
            new.operator, new.note, rules.to_micros(new.recorded_at))
        assert row is not None
        return _complaint(row, self.unit)

    def mark_withdrawn(self, ticket: str, at: datetime, operator: str,
                       note: str) -> c.Complaint:
        row = self._one(
            "UPDATE complaints SET withdrawn_at = ?, withdrawn_by = ?, withdraw_note = ?"
            " WHERE ticket = ? RETURNING *", rules.to_micros(at), operator, note, ticket)
        assert row is not None
        return _complaint(row, self.unit)

    def posting_exists(self, account: str, key: str) -> bool:
        return self._one("SELECT 1 FROM postings WHERE account = ? AND key = ?",
                         account, key) is not None

    def post(self, account: str, kind: PostingKind, units: int, at: datetime, ref: str,
             key: str, note: str, operator: str) -> None:
        self.conn.execute("UPDATE accounts SET posted = posted + ? WHERE id = ?",
                          (rules.posted_delta(kind, units), account))
        self.conn.execute(
            "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (account, kind.value, units, rules.to_micros(at), ref, key, note, operator))

    def count_complaints(self, account: str, after: datetime, until: datetime) -> int:
        row = self._one("SELECT count(*) FROM complaints WHERE account = ? AND at > ?"
                        " AND at <= ? AND withdrawn_at IS NULL",
                        account, rules.to_micros(after), rules.to_micros(until))
        assert row is not None
        return int(row[0])

    def insert_suspension(self, account: str, reason: str, operator: str,
                          at: datetime) -> c.Suspension | None:
        row = self._one("INSERT INTO suspensions (account, reason, operator, at)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT (account) DO NOTHING RETURNING *",
                        account, reason, operator, rules.to_micros(at))
        return None if row is None else _suspension(row)

    def suspension(self, account: str) -> c.Suspension | None:
        row = self._one("SELECT * FROM suspensions WHERE account = ?", account)
        return None if row is None else _suspension(row)

    def delete_suspension(self, account: str) -> bool:
        return self.conn.execute("DELETE FROM suspensions WHERE account = ?",
                                 (account,)).rowcount > 0

    def log_account(self, account: str, action: str, reason: str, operator: str,
                    at: datetime) -> None:
        self.conn.execute("INSERT INTO account_log (account, action, reason, operator, at)"
                          " VALUES (?, ?, ?, ?, ?)",
                          (account, action, reason, operator, rules.to_micros(at)))

    def dnc_entry(self, account: str, number: str) -> c.DncEntry | None:
        row = self._one("SELECT * FROM dnc WHERE account = ? AND number = ?", account, number)
        return None if row is None else _entry(row)

    def log_dnc(self, account: str, number: str, added: bool, reason: str, operator: str,
                at: datetime) -> int:
        row = self._one("INSERT INTO dnc_log (account, number, added, reason, operator, at)"
                        " VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
                        account, number, int(added), reason, operator, rules.to_micros(at))
        assert row is not None
        return int(row[0])

    def insert_dnc(self, account: str, number: str, reason: str, operator: str,
                   at: datetime, seq: int) -> c.DncEntry:
        row = self._one("INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
                        " VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
                        account, number, reason, operator, rules.to_micros(at), seq)
        assert row is not None
        return _entry(row)

    def delete_dnc(self, account: str, number: str) -> bool:
        return self.conn.execute("DELETE FROM dnc WHERE account = ? AND number = ?",
                                 (account, number)).rowcount > 0


class SqliteCompliance(plans.ComplianceFront):
    unit: Decimal

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *,
                     abandonable: bool = False) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _point_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _transact(self, plan_of: Callable[[plans.Store], plans.Plan[T]]) -> T:
        unit = self.unit
        return await self._write(lambda conn: plans.run_sync(plan_of(SqliteStore(conn, unit))))

    # -- complaints -------------------------------------------------------------
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
        return await self._read(lambda conn: SqliteStore(conn, unit).complaint(ticket))

    # -- suspension -------------------------------------------------------------
    async def suspension(self, account: str) -> c.Suspension | None:
        unit = self.unit
        return await self._point_read(lambda conn: SqliteStore(conn, unit).suspension(account))

    async def account_events(self, account: str) -> list[c.AccountEvent]:
        def run(conn: sqlite3.Connection) -> list[c.AccountEvent]:
            rows = conn.execute("SELECT * FROM account_log WHERE account = ? ORDER BY id",
                                (account,))
            return [c.AccountEvent(r["account"], r["action"], r["reason"], r["operator"],
                                   rules.from_micros(r["at"])) for r in rows]

        return await self._read(run)

    # -- live do-not-call ---------------------------------------------------------
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
                    out[account] = _keys(conn, account)
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
