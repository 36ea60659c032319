"""The PostgreSQL ledger's compliance storage: complaints, live DNC, suspensions.

A mixin of :class:`~agent.ledger.postgres.PostgresLedger` (its ``_run``,
``_tx``, ``_conn`` and ``unit``); the rules are in
:mod:`agent.ledger.compliance`. Every write that touches the live do-not-call
list first takes one transaction-scoped advisory lock, so the change log's
``seq`` values commit in order: a node polling ``seq > last`` can never see
``n + 1`` before ``n`` (a BIGSERIAL alone hands out numbers at insert, not at
commit). Such writes are rare (an operator, a complaint), so the lock costs
nothing that matters; the gate's path never takes it.
"""

from __future__ import annotations

from array import array
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from agent.ledger import _rules as rules
from agent.ledger import compliance as c
from agent.ledger.model import PostingKind, RefusedOperation, UnknownAccount

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


async def _dnc_add(conn: Any, account: str, number: str, reason: str, operator: str,
                   when: datetime) -> tuple[c.DncEntry, bool]:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", c.DNC_LOCK)
    row = await conn.fetchrow("SELECT * FROM dnc WHERE account = $1 AND number = $2",
                              account, number)
    if row is not None:
        return _entry(row), False
    seq = await conn.fetchval(
        "INSERT INTO dnc_log (account, number, added, reason, operator, at)"
        " VALUES ($1, $2, true, $3, $4, $5) RETURNING seq",
        account, number, reason, operator, when)
    row = await conn.fetchrow(
        "INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
        account, number, reason, operator, when, seq)
    return _entry(row), True


async def _log_account(conn: Any, account: str, action: str, reason: str, operator: str,
                       when: datetime) -> None:
    await conn.execute("INSERT INTO account_log (account, action, reason, operator, at)"
                       " VALUES ($1, $2, $3, $4, $5)", account, action, reason, operator, when)


class PgCompliance:
    unit: Decimal

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _tx(self, isolation: str = "read_committed") -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    def _conn(self) -> AbstractAsyncContextManager[Any]:
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
        when = rules.check_time(at)
        recorded = rules.check_time(recorded_at)
        units = rules.to_units(fine, self.unit, what="complaint fine")
        if units < 0:
            raise RefusedOperation("a complaint fine must not be negative")
        unit = self.unit
        ref = c.penalty_ref(ticket)
        key = rules.finance_key(PostingKind.PENALTY, ref)

        async def run(conn: Any) -> c.ComplaintOutcome:
            # The DNC lock first (lock order: dnc, account), and it also serialises
            # two nodes recording the same ticket at once.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", c.DNC_LOCK)
            row = await conn.fetchrow("SELECT * FROM complaints WHERE ticket = $1", ticket)
            if row is not None:
                stored = _complaint(row, unit)
                c.complaint_replay(stored, account, callee, when, note)
                return c.ComplaintOutcome(stored, created=False)
            if units:
                found = await conn.fetchval(
                    "SELECT true FROM accounts WHERE id = $1 FOR UPDATE", account)
                if not found:
                    raise UnknownAccount(f"the ledger has no account {account!r} to fine")
            row = await conn.fetchrow(
                "INSERT INTO complaints (ticket, account, callee, at, fine, operator, note,"
                " recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
                ticket, account, callee, when, units, operator, note, recorded)
            if units and await conn.fetchval(
                    "SELECT 1 FROM postings WHERE account = $1 AND key = $2",
                    account, key) is None:
                await conn.execute("UPDATE accounts SET posted = posted - $1 WHERE id = $2",
                                   units, account)
                await conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
                    " VALUES ($1, 'penalty', $2, $3, $4, $5, $6, $7)",
                    account, units, when, ref, key, f"complaint {ticket}", operator)
            await _dnc_add(conn, account, callee, f"complaint {ticket}", operator, when)
            count, suspended = 0, False
            if suspend is not None:
                count = await conn.fetchval(
                    "SELECT count(*) FROM complaints WHERE account = $1 AND at > $2"
                    " AND at <= $3 AND withdrawn_at IS NULL",
                    account, when - suspend.period, when)
                already = await conn.fetchval(
                    "SELECT true FROM suspensions WHERE account = $1", account)
                if suspend.due(count) and not already:
                    why = suspend.describe(count)
                    await conn.execute(
                        "INSERT INTO suspensions (account, reason, operator, at)"
                        " VALUES ($1, $2, $3, $4)", account, why, operator, recorded)
                    await _log_account(conn, account, "suspend", why, operator, recorded)
                    suspended = True
            return c.ComplaintOutcome(_complaint(row, unit), True, int(count), suspended)

        return await self._run(run)

    async def withdraw_complaint(
        self, ticket: str, *, operator: str, at: datetime, note: str = ""
    ) -> tuple[c.Complaint, bool]:
        c.check_note(note)
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)
        unit = self.unit
        ref = c.reversal_ref(ticket)
        key = rules.finance_key(PostingKind.ADJUSTMENT, ref)

        async def run(conn: Any) -> tuple[c.Complaint, bool]:
            row = await conn.fetchrow(
                "SELECT * FROM complaints WHERE ticket = $1 FOR UPDATE", ticket)
            if row is None:
                raise RefusedOperation(f"the ledger has no complaint {ticket!r}")
            if row["withdrawn_at"] is not None:
                return _complaint(row, unit), False
            account, units = row["account"], row["fine"]
            if units and await conn.fetchval(
                    "SELECT 1 FROM postings WHERE account = $1 AND key = $2",
                    account, key) is None:
                await conn.execute("UPDATE accounts SET posted = posted + $1 WHERE id = $2",
                                   units, account)
                await conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
                    " VALUES ($1, 'adjustment', $2, $3, $4, $5, $6, $7)",
                    account, units, when, ref, key, f"complaint {ticket} withdrawn", operator)
            row = await conn.fetchrow(
                "UPDATE complaints SET withdrawn_at = $1, withdrawn_by = $2,"
                " withdraw_note = $3 WHERE ticket = $4 RETURNING *",
                when, operator, note, ticket)
            return _complaint(row, unit), True

        return await self._run(run)

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
            row = await conn.fetchrow("SELECT * FROM complaints WHERE ticket = $1", ticket)
        return None if row is None else _complaint(row, self.unit)

    # -- suspension -------------------------------------------------------------
    async def suspend(
        self, account: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[c.Suspension, bool]:
        c.check_text(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)

        async def run(conn: Any) -> tuple[c.Suspension, bool]:
            row = await conn.fetchrow(
                "INSERT INTO suspensions (account, reason, operator, at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (account) DO NOTHING RETURNING *",
                account, reason, operator, when)
            if row is None:
                row = await conn.fetchrow("SELECT * FROM suspensions WHERE account = $1",
                                          account)
                return _suspension(row), False
            await _log_account(conn, account, "suspend", reason, operator, when)
            return _suspension(row), True

        return await self._run(run)

    async def resume(
        self, account: str, *, operator: str, at: datetime, note: str = ""
    ) -> bool:
        c.check_note(note)
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)

        async def run(conn: Any) -> bool:
            status = await conn.execute("DELETE FROM suspensions WHERE account = $1", account)
            if status.split()[-1] == "0":
                return False
            await _log_account(conn, account, "resume", note, operator, when)
            return True

        return await self._run(run)

    async def suspension(self, account: str) -> c.Suspension | None:
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT * FROM suspensions WHERE account = $1", account)
        return None if row is None else _suspension(row)

    async def account_events(self, account: str) -> list[c.AccountEvent]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT * FROM account_log WHERE account = $1 ORDER BY id", account)
        return [c.AccountEvent(r["account"], r["action"], r["reason"], r["operator"], r["at"])
                for r in rows]

    # -- live do-not-call ---------------------------------------------------------
    async def dnc_add(
        self, account: str, number: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[c.DncEntry, bool]:
        c.check_number(number)
        c.check_text(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)
        return await self._run(
            lambda conn: _dnc_add(conn, account, number, reason, operator, when))

    async def dnc_remove(
        self, account: str, number: str, *, operator: str, at: datetime, reason: str = ""
    ) -> bool:
        c.check_note(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)

        async def run(conn: Any) -> bool:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", c.DNC_LOCK)
            status = await conn.execute("DELETE FROM dnc WHERE account = $1 AND number = $2",
                                        account, number)
            if status.split()[-1] == "0":
                return False
            await conn.execute(
                "INSERT INTO dnc_log (account, number, added, reason, operator, at)"
                " VALUES ($1, $2, false, $3, $4, $5)", account, number, reason, operator, when)
            return True

        return await self._run(run)

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
                keys.append(int(b"1" + number))

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
