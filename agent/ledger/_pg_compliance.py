"""The PostgreSQL ledger's compliance storage: complaints, live DNC, suspensions (only SQL).

A mixin of :class:`~agent.ledger.postgres.PostgresLedger` (its ``_run``,
``_tx``, ``_conn`` and ``unit``). What a write does and decides is
:mod:`agent.ledger._compliance_rules`; here is :class:`PgStore`, one SQL
statement a step, and the reads. A write's plan runs inside one transaction
(``_run``). Every write that touches the live do-not-call list first takes
one transaction-scoped advisory lock (:meth:`PgStore.lock_dnc`), so the
change log's ``seq`` values commit in order: a node polling ``seq > last``
can never see ``n + 1`` before ``n`` (a BIGSERIAL alone hands out numbers at
insert, not at commit). Such writes are rare (an operator, a complaint), so
the lock costs nothing that matters; the gate's path never takes it.
"""

from __future__ import annotations

from array import array
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from agent.ledger import _compliance_rules as plans
from agent.ledger import _rules as rules
from agent.ledger import compliance as c
from agent.ledger.model import PostingKind

T = TypeVar("T")


def _complaint(row: Any, unit: Decimal) -> c.Complaint:
    return c.Complaint(
        ticket=row["ticket"], account=row["account"], callee=row["callee"], at=row["at"],
        fine=rules.from_units(row["fine"], unit), operator=row["operator"], note=row["note"],
        recorded_at=row["recorded_at"], withdrawn_at=row["withdrawn_at"],
        withdrawn_by=row["withdrawn_by"], withdraw_note=row["withdraw_note"],
    )


def _entry(row: Any) -> c.DncEntry:
    return c.DncEntry(row["account"], row["number"], row["reason"], row["operator"],
                      row["added_at"], row["seq"])


def _suspension(row: Any) -> c.Suspension:
    return c.Suspension(row["account"], row["reason"], row["operator"], row["at"])


def _changed(status: str) -> bool:
    """A DELETE's status (``DELETE 1``): did it remove a row?"""
    return status.split()[-1] != "0"


class PgStore:
    """:class:`agent.ledger._compliance_rules.Store` on one connection in a transaction."""

    def __init__(self, conn: Any, unit: Decimal) -> None:
        self.conn, self.unit = conn, unit

    async def lock_dnc(self) -> None:
        await self.conn.execute("SELECT pg_advisory_xact_lock($1)", c.DNC_LOCK)

    async def complaint(self, ticket: str, *, for_update: bool = False) -> c.Complaint | None:
        lock = " FOR UPDATE" if for_update else ""
        row = await self.conn.fetchrow(f"SELECT * FROM complaints WHERE ticket = $1{lock}",
                                       ticket)
        return None if row is None else _complaint(row, self.unit)

    async def account_closed(self, account: str) -> bool | None:
        closed: bool | None = await self.conn.fetchval(
            "SELECT closed FROM accounts WHERE id = $1 FOR UPDATE", account)
        return closed

    async def insert_complaint(self, new: plans.NewComplaint) -> c.Complaint:
        row = await self.conn.fetchrow(
            "INSERT INTO complaints (ticket, account, callee, at, fine, operator, note,"
            " recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
            new.ticket, new.account, new.callee, new.at, new.units, new.operator, new.note,
            new.recorded_at)
        return _complaint(row, self.unit)

    async def mark_withdrawn(self, ticket: str, at: datetime, operator: str,
                             note: str) -> c.Complaint:
        row = await self.conn.fetchrow(
            "UPDATE complaints SET withdrawn_at = $1, withdrawn_by = $2, withdraw_note = $3"
            " WHERE ticket = $4 RETURNING *", at, operator, note, ticket)
        return _complaint(row, self.unit)

    async def posting_exists(self, account: str, key: str) -> bool:
        return await self.conn.fetchval("SELECT 1 FROM postings WHERE account = $1 AND key = $2",
                                        account, key) is not None

    async def post(self, account: str, kind: PostingKind, units: int, at: datetime, ref: str,
                   key: str, note: str, operator: str) -> None:
        await self.conn.execute("UPDATE accounts SET posted = posted + $1 WHERE id = $2",
                                rules.posted_delta(kind, units), account)
        await self.conn.execute(
            "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            account, kind.value, units, at, ref, key, note, operator)

    async def count_complaints(self, account: str, after: datetime, until: datetime) -> int:
        return int(await self.conn.fetchval(
            "SELECT count(*) FROM complaints WHERE account = $1 AND at > $2 AND at <= $3"
            " AND withdrawn_at IS NULL", account, after, until))

    async def insert_suspension(self, account: str, reason: str, operator: str,
                                at: datetime) -> c.Suspension | None:
        row = await self.conn.fetchrow(
            "INSERT INTO suspensions (account, reason, operator, at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (account) DO NOTHING RETURNING *", account, reason, operator, at)
        return None if row is None else _suspension(row)

    async def suspension(self, account: str) -> c.Suspension | None:
        row = await self.conn.fetchrow("SELECT * FROM suspensions WHERE account = $1", account)
        return None if row is None else _suspension(row)

    async def delete_suspension(self, account: str) -> bool:
        return _changed(await self.conn.execute("DELETE FROM suspensions WHERE account = $1",
                                                account))

    async def log_account(self, account: str, action: str, reason: str, operator: str,
                          at: datetime) -> None:
        await self.conn.execute("INSERT INTO account_log (account, action, reason, operator, at)"
                                " VALUES ($1, $2, $3, $4, $5)",
                                account, action, reason, operator, at)

    async def dnc_entry(self, account: str, number: str) -> c.DncEntry | None:
        row = await self.conn.fetchrow("SELECT * FROM dnc WHERE account = $1 AND number = $2",
                                       account, number)
        return None if row is None else _entry(row)

    async def log_dnc(self, account: str, number: str, added: bool, reason: str,
                      operator: str, at: datetime) -> int:
        return int(await self.conn.fetchval(
            "INSERT INTO dnc_log (account, number, added, reason, operator, at)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
            account, number, added, reason, operator, at))

    async def insert_dnc(self, account: str, number: str, reason: str, operator: str,
                         at: datetime, seq: int) -> c.DncEntry:
        row = await self.conn.fetchrow(
            "INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            account, number, reason, operator, at, seq)
        return _entry(row)

    async def delete_dnc(self, account: str, number: str) -> bool:
        return _changed(await self.conn.execute(
            "DELETE FROM dnc WHERE account = $1 AND number = $2", account, number))


class PgCompliance(plans.ComplianceFront):
    unit: Decimal

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _tx(self, isolation: str = "read_committed") -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    def _conn(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def _transact(self, plan_of: Callable[[plans.Store], plans.Plan[T]]) -> T:
        unit = self.unit
        return await self._run(lambda conn: plans.run_async(plan_of(PgStore(conn, unit))))

    # -- complaints -------------------------------------------------------------
    async def complaints(
        self, account: str | None = None, start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[c.Complaint]:
        lo = rules.check_time(start) if start is not None else None
        hi = rules.check_time(end) if end is not None else None
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT * FROM complaints WHERE ($1::text IS NULL OR account = $1)"
                " AND ($2::timestamptz IS NULL OR at >= $2)"
                " AND ($3::timestamptz IS NULL OR at < $3) ORDER BY at, ticket",
                account, lo, hi)
        return [_complaint(r, self.unit) for r in rows]

    async def complaint(self, ticket: str) -> c.Complaint | None:
        async with self._conn() as conn:
            return await PgStore(conn, self.unit).complaint(ticket)

    # -- suspension -------------------------------------------------------------
    async def suspension(self, account: str) -> c.Suspension | None:
        async with self._conn() as conn:
            return await PgStore(conn, self.unit).suspension(account)

    async def account_events(self, account: str) -> list[c.AccountEvent]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT * FROM account_log WHERE account = $1 ORDER BY id", account)
        return [c.AccountEvent(r["account"], r["action"], r["reason"], r["operator"], r["at"])
                for r in rows]

    # -- live do-not-call ---------------------------------------------------------
    async def dnc_list(self, account: str | None = None) -> list[c.DncEntry]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT * FROM dnc WHERE ($1::text IS NULL OR account = $1)"
                " ORDER BY account, number", account)
        return [_entry(r) for r in rows]

    async def dnc_lookup(self, account: str, number: str) -> list[c.DncEntry]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT * FROM dnc WHERE account IN ($1, '')"
                                    " AND number = $2 ORDER BY account", account, number)
        return [_entry(r) for r in rows]

    async def dnc_snapshot(self) -> tuple[int, dict[str, array[int]]]:
        out: dict[str, array[int]] = {}
        tail = b""

        # COPY streams the rows as text in large chunks: a million entries arrive in
        # about a second, where a cursor of Records costs many times that.
        async def sink(chunk: bytes) -> None:
            nonlocal tail
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                account, _, number = line.partition(b"\t")
                name = account.decode()
                keys = out.get(name)
                if keys is None:
                    keys = out[name] = array("Q")
                try:
                    keys.append(int(b"1" + number))
                except ValueError:  # not ASCII digits: a row from before the ledger checked
                    continue

        # REPEATABLE READ: the entries and the change number come from one snapshot.
        async with self._tx(isolation="repeatable_read") as conn:
            seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM dnc_log")
            await conn.copy_from_query("SELECT account, number FROM dnc", output=sink)
        if tail:
            await sink(b"\n")
        return int(seq), out

    async def dnc_changes(self, after: int, limit: int = 10_000) -> list[c.DncChange]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT seq, account, number, added FROM dnc_log WHERE seq > $1"
                " ORDER BY seq LIMIT $2", after, limit)
        return [c.DncChange(r[0], r[1], r[2], r[3]) for r in rows]
