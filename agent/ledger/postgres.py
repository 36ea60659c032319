"""The PostgreSQL ledger (asyncpg): one balance shared by agents on several PBX nodes.

Same tables and the same rules as the SQLite ledger (agent/ledger/_rules.py).
Concurrency comes from row locks under READ COMMITTED: a write first locks the
row it decides on (the account for finance and admission, the call for holds and
settlement), and a hold raises the account's ``held`` with one conditional
UPDATE, which PostgreSQL re-evaluates against the newest row version after
waiting for a concurrent writer, so holds from any node can never overdraw.
Lock order is always call, then account, so two writers cannot deadlock.
Requests of one kind that queue up while the agent's statements of that kind
are busy go to the server together, as one batch statement and one commit
(group commit, agent/ledger/_pg_batch.py); a batch locks its calls, then its
accounts, each in id order, and runs the single request's function per element.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from agent.ledger import _pg_statements as sql
from agent.ledger import _rules as rules
from agent.ledger._pg_batch import BatchFailed, Lane
from agent.ledger._pg_compliance import PgCompliance
from agent.ledger._pg_schema import MIGRATION_LOCK as MIGRATION_LOCK
from agent.ledger._pg_schema import MIGRATIONS as MIGRATIONS
from agent.ledger._pg_schema import migrate
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

# What a lost, unreachable, shutting-down or exhausted server raises in asyncpg:
# SQLSTATE classes 08 (connection), 57 (operator intervention: admin shutdown,
# crash, cancelled statement) and 53 (insufficient resources: disk full, too
# many connections). None of these says anything about the request itself.
_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # the protocol state after a connection died mid-query
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


async def _keep_session(conn: Any) -> None:
    """Pool reset hook: a no-op. The ledger leaves no session state behind (no SET,
    LISTEN or session advisory locks; its locks are transaction-scoped), and the
    default reset costs a round trip on every release."""


# Statements of one kind (state reads, admissions, holds, settlements) in flight
# at once per agent; requests beyond wait and go together as one batch. Measured
# with bench/gate_ledger.py (bench/RESULTS.md, session 8).
LANES = 2

_ADMISSIONS = {"admitted": Admission.ADMITTED, "lines_busy": Admission.LINES_BUSY,
               "no_funds": Admission.NO_FUNDS}


def _posting(row: asyncpg.Record, unit: Decimal) -> Posting:
    return Posting(
        id=row["id"],
        account=row["account"],
        kind=PostingKind(row["kind"]),
        amount=rules.from_units(row["amount"], unit),
        at=row["at"],
        ref=row["ref"],
        key=row["key"],
        call_id=row["call_id"],
        note=row["note"],
        operator=row["operator"],
    )


def _call(row: asyncpg.Record, unit: Decimal) -> CallRecord:
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
        admitted_at=row["admitted_at"],
        answered_at=row["answered_at"],
        paid_seconds=row["paid_seconds"],
        held=rules.from_units(row["held"], unit),
        steps=row["steps"],
        status=CallStatus(row["status"]),
    )


def _cdr(row: asyncpg.Record, unit: Decimal) -> Cdr:
    return Cdr(
        call_id=row["call_id"],
        account=row["account"],
        caller=row["caller"],
        callee=row["callee"],
        answered_at=row["answered_at"],
        ended_at=row["ended_at"],
        billsec=row["billsec"],
        billed_seconds=row["billed_seconds"],
        amount=rules.from_units(row["amount"], unit),
        cause=row["cause"],
        cut_off=row["cut_off"],
        flags=tuple(json.loads(row["flags"])),
        node=row["node"],
        pbx_billsec=row["pbx_billsec"],
        correction=rules.from_units(row["correction"], unit),
    )


def _balance(row: asyncpg.Record, unit: Decimal) -> Balance:
    return Balance(
        account=row["id"],
        posted=rules.from_units(row["posted"], unit),
        held=rules.from_units(row["held"], unit),
        closed=row["closed"],
    )


def _where(url: str) -> str:
    """The server part of a URL, for messages (never the password)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path}"


def split_options(url: str) -> tuple[str, dict[str, str]]:
    """Take callgate's own query options out of a PostgreSQL URL.

    asyncpg passes the remaining query parameters to the server as settings
    (so ``?search_path=tenant1`` selects a schema).
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in ("minor_unit", "pool_size", "max_posting")}
    rest = [(k, v) for k, v in query if k not in ours]
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), "")), ours


class PostgresLedger(rules.FinanceFront, PgCompliance):
    """The ledger in PostgreSQL. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, pool: asyncpg.Pool, unit: Decimal, where: str, *,
                 max_posting: Decimal = rules.DEFAULT_MAX_POSTING, created: bool = False,
                 lanes: int | None = None) -> None:
        self._pool = pool
        self.unit = unit
        self.where = where
        self.max_posting = max_posting
        self.created = created  # this open made the store
        # Group commit (agent/ledger/_pg_batch.py): per kind of request, this many
        # statements in flight; what queues behind them goes as one batch.
        lanes = LANES if lanes is None else lanes
        self._reads: Lane[tuple[Any, ...], Any] = Lane(lanes, self._read_one, self._read_many,
                                                       abandonable=True)
        self._admits: Lane[tuple[Any, ...], str] = Lane(lanes, self._admit_one,
                                                        self._admit_many, abandonable=True)
        self._holds: Lane[tuple[Any, ...], str] = Lane(lanes, self._hold_one, self._hold_many)
        self._settles: Lane[tuple[Any, ...], Any] = Lane(lanes, self._settle_one,
                                                         self._settle_many)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        minor_unit: Decimal = MINOR_UNIT,
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        create: bool = True,
        max_posting: Decimal = rules.DEFAULT_MAX_POSTING,
    ) -> PostgresLedger:
        """Connect, then create or migrate the schema (in the URL's search_path).

        With ``create=False`` a database without callgate's tables is a
        :class:`LedgerError` and nothing is created in it. With ``create=True``
        the first schema of a ``search_path`` that does not exist yet is created.
        """
        where = _where(url)
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=pool_size, timeout=connect_timeout,
                command_timeout=30, reset=_keep_session,
            )
        except _CONNECTION_ERRORS as exc:
            raise LedgerUnavailable(
                f"cannot reach the PostgreSQL ledger at {where}: {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise LedgerUnavailable(f"the PostgreSQL ledger at {where} refused us: {exc}") from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                unit, created = await migrate(conn, where, minor_unit, create)
        except asyncpg.PostgresError as exc:
            await pool.close()
            raise LedgerError(
                f"the PostgreSQL ledger at {where} refused to set up its tables: {exc}"
            ) from None
        except BaseException:
            await pool.close()
            raise
        return cls(pool, unit, where, max_posting=max_posting, created=created)

    async def close(self) -> None:
        for lane in (self._reads, self._admits, self._holds, self._settles):
            await lane.wait()
        await self._pool.close()

    async def _batch(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run one batch statement; a refusal of the whole batch (any server error but a
        lost connection) is BatchFailed, so its elements are sent one by one."""
        try:
            async with self._conn() as conn:
                return await fn(conn)
        except LedgerUnavailable:
            raise
        except asyncpg.PostgresError as exc:
            raise BatchFailed(str(exc)) from exc

    @asynccontextmanager
    async def _tx(self, isolation: str = "read_committed") -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire() as conn, conn.transaction(isolation=isolation):
                yield conn
        except _CONNECTION_ERRORS as exc:
            raise LedgerUnavailable(f"lost the PostgreSQL ledger at {self.where}: {exc}") from exc

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A connection for reads that need no transaction (one round trip each)."""
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _CONNECTION_ERRORS as exc:
            raise LedgerUnavailable(f"lost the PostgreSQL ledger at {self.where}: {exc}") from exc

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._tx() as conn:
            return await fn(conn)

    # -- finance --------------------------------------------------------------
    async def _finance(
        self, kind: PostingKind, account: str, units: int | None, ref: str, at: datetime,
        note: str, first_minimum: int = 0, operator: str = "",
    ) -> Posting:
        rules.check_ref(ref)
        when = rules.check_time(at)
        key = rules.finance_key(kind, ref)
        unit = self.unit

        async def run(conn: Any) -> Posting:
            lock = "SELECT posted, held, closed FROM accounts WHERE id = $1 FOR UPDATE"
            acc = await conn.fetchrow(lock, account)
            if acc is None and kind is PostingKind.TOPUP:
                assert units is not None
                rules.first_topup_check(account, units, first_minimum, unit)
                # Another node may create it at the same moment; then this one
                # waits for that row and goes on as a later top-up.
                await conn.execute(
                    "INSERT INTO accounts (id, created_at) VALUES ($1, $2)"
                    " ON CONFLICT (id) DO NOTHING",
                    account, when,
                )
                acc = await conn.fetchrow(lock, account)
            if acc is None:
                raise UnknownAccount(f"the ledger has no account {account!r}")
            row = await conn.fetchrow(
                "SELECT * FROM postings WHERE account = $1 AND key = $2", account, key
            )
            if row is not None:
                if rules.finance_replay_matches(kind, row["amount"], row["note"], units, note):
                    return _posting(row, unit)
                raise rules.finance_conflict(kind, account, ref, row["amount"], unit)
            closed_after = rules.lifecycle(account, kind, acc["closed"])
            amount = units
            if kind is PostingKind.REFUND:
                live = await conn.fetchval(
                    "SELECT count(*) FROM calls WHERE account = $1 AND status != 'ended'",
                    account,
                )
                amount = rules.refund_units(account, acc["posted"], acc["held"], live, unit)
            assert amount is not None
            delta = rules.posted_delta(kind, amount)
            rules.check_total(account, acc["posted"] + delta, unit)
            await conn.execute(
                "UPDATE accounts SET posted = posted + $1, closed = $2 WHERE id = $3",
                delta, closed_after, account,
            )
            inserted = await conn.fetchrow(
                "INSERT INTO postings (account, kind, amount, at, ref, key, note, operator)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
                account, kind.value, amount, when, ref, key, note, operator,
            )
            return _posting(inserted, unit)

        return await self._run(run)

    async def balance(self, account: str) -> Balance:
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", account)
        if row is None:
            raise UnknownAccount(f"the ledger has no account {account!r}")
        return _balance(row, self.unit)

    async def balances(self) -> list[Balance]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT * FROM accounts ORDER BY id")
        return [_balance(r, self.unit) for r in rows]

    async def history(self, account: str, since: datetime | None = None) -> list[Posting]:
        start = rules.check_time(since) if since is not None else None
        async with self._conn() as conn:
            if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account) is None:
                raise UnknownAccount(f"the ledger has no account {account!r}")
            rows = await conn.fetch(
                "SELECT * FROM postings WHERE account = $1"
                " AND ($2::timestamptz IS NULL OR at >= $2) ORDER BY id",
                account, start,
            )
        return [_posting(r, self.unit) for r in rows]

    # -- calls ----------------------------------------------------------------
    async def admit_call(self, call: CallRecord, max_live: int | None) -> bool:
        return await self._run(self._admit_job(call, max_live))

    def _admit_job(
        self, call: CallRecord, max_live: int | None
    ) -> Callable[[Any], Awaitable[bool]]:
        rate = rules.to_units(call.rate, self.unit, what="rate")
        admitted = rules.check_time(call.admitted_at)
        answered = rules.check_time(call.answered_at) if call.answered_at else None

        async def run(conn: Any) -> bool:
            # Locking the account row serialises admissions across every node.
            acc = await conn.fetchrow(
                "SELECT closed FROM accounts WHERE id = $1 FOR UPDATE", call.account
            )
            if acc is None:
                raise UnknownAccount(f"the ledger has no account {call.account!r}")
            existing = await conn.fetchrow(
                "SELECT account, status FROM calls WHERE call_id = $1", call.call_id
            )
            if existing is not None:
                return rules.readmit(call, existing["account"], existing["status"])
            if acc["closed"]:
                raise rules.closed_error(call.account)
            if max_live is not None:
                live = await conn.fetchval(
                    "SELECT count(*) FROM calls WHERE account = $1 AND status != 'ended'",
                    call.account,
                )
                if live >= max_live:
                    return False
            await conn.execute(
                "INSERT INTO calls (call_id, account, node, caller, callee, tariff_name, rate,"
                " increment, minimum, admitted_at, answered_at, status)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                call.call_id, call.account, call.node, call.caller, call.callee,
                call.tariff_name, rate, call.increment, call.minimum, admitted, answered,
                (CallStatus.ANSWERED if answered is not None else CallStatus.ADMITTED).value,
            )
            return True

        return run

    async def answer_call(self, call_id: str, answered_at: datetime) -> CallRecord:
        when = rules.check_time(answered_at)
        async with self._conn() as conn:
            # One statement, one round trip: the updated row, or the row as it is
            # when the call was not waiting for its answer.
            row = await conn.fetchrow(
                "WITH u AS (UPDATE calls SET status = 'answered', answered_at = $1"
                "   WHERE call_id = $2 AND status = 'admitted' RETURNING *)"
                " SELECT * FROM u UNION ALL"
                " SELECT * FROM calls WHERE call_id = $2 AND NOT EXISTS (SELECT 1 FROM u)",
                when, call_id,
            )
        if row is None:
            raise rules.unknown_call(call_id)
        return _call(row, self.unit)

    async def hold(
        self, call_id: str, step: int, amount: Decimal, paid_seconds: int, at: datetime
    ) -> bool:
        job = self._hold_job(call_id, step, amount, paid_seconds, at)
        quick = await self._holds.submit((
            call_id, rules.positive_units(amount, self.unit, what="hold"), paid_seconds,
            rules.check_time(at), rules.hold_key(call_id, step)))
        if quick != "careful":
            return bool(quick == "held")
        return await self._run(job)

    def _hold_job(
        self, call_id: str, step: int, amount: Decimal, paid_seconds: int, at: datetime
    ) -> Callable[[Any], Awaitable[bool]]:
        units = rules.positive_units(amount, self.unit, what="hold")
        when = rules.check_time(at)
        key = rules.hold_key(call_id, step)
        unit = self.unit

        async def run(conn: Any) -> bool:
            call = await conn.fetchrow(
                "SELECT account, status FROM calls WHERE call_id = $1 FOR UPDATE", call_id
            )
            if call is None:
                raise rules.unknown_call(call_id)
            account = call["account"]
            done = await conn.fetchval(
                "SELECT amount FROM postings WHERE account = $1 AND key = $2", account, key
            )
            if done is not None:
                if done != units:
                    raise IdempotencyConflict(
                        f"step {step} of call {call_id!r} was already held for "
                        f"{rules.show(done, unit)}, not {rules.show(units, unit)}"
                    )
                return True
            if call["status"] == CallStatus.ENDED:
                raise RefusedOperation(f"call {call_id!r} has already been settled")
            raised = await conn.fetchval(
                "UPDATE accounts SET held = held + $1"
                " WHERE id = $2 AND NOT closed AND posted - held >= $1 RETURNING true",
                units, account,
            )
            if not raised:
                if await conn.fetchval("SELECT closed FROM accounts WHERE id = $1", account):
                    raise rules.closed_error(account)
                return False
            await conn.execute(
                "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                " VALUES ($1, 'hold', $2, $3, $4, $5, $4)",
                account, units, when, call_id, key,
            )
            await conn.execute(
                "UPDATE calls SET held = held + $1, paid_seconds = greatest(paid_seconds, $2),"
                " steps = steps + 1 WHERE call_id = $3",
                units, paid_seconds, call_id,
            )
            return True

        return run

    async def settle_call(self, cdr: Cdr) -> Cdr:
        fingerprint = rules.cdr_fingerprint(cdr)
        amount = rules.to_units(cdr.amount, self.unit, what="call amount")
        ended = rules.check_time(cdr.ended_at)
        answered = rules.check_time(cdr.answered_at) if cdr.answered_at else None
        unit = self.unit
        rules.check_call_amount(amount)
        quick = await self._settles.submit((
            cdr.call_id, cdr.account, cdr.caller, cdr.callee, answered, ended, cdr.billsec,
            cdr.billed_seconds, amount, cdr.cause, cdr.cut_off, json.dumps(list(cdr.flags)),
            json.dumps([*cdr.flags, "capped"]), cdr.node, fingerprint,
        ))
        if quick is not None:
            if quick["submitted"] != fingerprint:
                raise rules.settle_conflict(cdr.call_id)
            return _cdr(quick, unit)

        async def run(conn: Any) -> Cdr:
            # The careful path: only to say why the function settled nothing.
            call = await conn.fetchrow(
                "SELECT account, held FROM calls WHERE call_id = $1 FOR UPDATE", cdr.call_id
            )
            if call is None:
                raise rules.unknown_call(cdr.call_id)
            stored = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", cdr.call_id)
            if stored is not None:
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
                    await conn.execute(
                        "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $5)",
                        account, kind.value, units, ended, cdr.call_id, key,
                    )
            await conn.execute(
                "UPDATE accounts SET posted = posted - $1, held = held - $2 WHERE id = $3",
                plan.charge, plan.charge + plan.release, account,
            )
            await conn.execute(
                "UPDATE calls SET held = 0, status = 'ended', ended_at = $1 WHERE call_id = $2",
                ended, cdr.call_id,
            )
            flags = (*cdr.flags, "capped") if plan.capped else cdr.flags
            row = await conn.fetchrow(
                "INSERT INTO cdrs (call_id, account, caller, callee, answered_at, ended_at,"
                " billsec, billed_seconds, amount, cause, cut_off, flags, node, submitted)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                " RETURNING *",
                cdr.call_id, account, cdr.caller, cdr.callee, answered, ended, cdr.billsec,
                cdr.billed_seconds, plan.charge, cdr.cause, cdr.cut_off,
                json.dumps(list(flags)), cdr.node, fingerprint,
            )
            return _cdr(row, unit)

        return await self._run(run)

    async def get_call(self, call_id: str) -> CallRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT * FROM calls WHERE call_id = $1", call_id)
        return None if row is None else _call(row, self.unit)

    async def live_calls(self, account: str | None = None) -> list[CallRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT * FROM calls WHERE status != 'ended'"
                " AND ($1::text IS NULL OR account = $1) ORDER BY admitted_at, call_id",
                account,
            )
        return [_call(r, self.unit) for r in rows]

    async def cdrs(self, account: str, start: datetime, end: datetime) -> list[Cdr]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT * FROM cdrs WHERE account = $1 AND ended_at >= $2 AND ended_at < $3"
                " ORDER BY ended_at, call_id",
                account, rules.check_time(start), rules.check_time(end),
            )
        return [_cdr(r, self.unit) for r in rows]

    # -- corrections from the PBX's own CDR ------------------------------------
    async def call_cdr(self, call_id: str) -> Cdr | None:
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", call_id)
        return None if row is None else _cdr(row, self.unit)

    async def correct_call(self, call_id: str, pbx_billsec: int, *, note: str = "",
                           operator: str = "") -> Cdr:
        unit = self.unit

        async def run(conn: Any) -> Cdr:
            # Lock order call, then account (as every writer here).
            call = await conn.fetchrow(
                "SELECT account, rate, increment, minimum FROM calls WHERE call_id = $1"
                " FOR UPDATE", call_id)
            if call is None:
                raise rules.unknown_call(call_id)
            cdr = await conn.fetchrow("SELECT * FROM cdrs WHERE call_id = $1", call_id)
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
                acc = await conn.fetchrow(
                    "SELECT posted, closed FROM accounts WHERE id = $1 FOR UPDATE",
                    call["account"])
                if acc["closed"]:
                    raise rules.closed_correction_error(call["account"], call_id)
                rules.check_total(call["account"], acc["posted"] - delta, unit)
                await conn.execute(
                    "INSERT INTO postings (account, kind, amount, at, ref, key, call_id, note,"
                    " operator) VALUES ($1, 'correction', $2, $3, $4, $5, $4, $6, $7)",
                    call["account"], delta, cdr["ended_at"], call_id,
                    rules.correction_key(call_id), note, operator,
                )
                await conn.execute("UPDATE accounts SET posted = posted - $1 WHERE id = $2",
                                   delta, call["account"])
            row = await conn.fetchrow(
                "UPDATE cdrs SET pbx_billsec = $1, correction = $2 WHERE call_id = $3"
                " RETURNING *", pbx_billsec, delta, call_id)
            return _cdr(row, unit)

        return await self._run(run)

    # -- attempts -------------------------------------------------------------
    async def record_attempt(
        self, account: str, destination: str, at: datetime, allowed: bool, reason: str,
        caller: str = "",
    ) -> None:
        async with self._conn() as conn:  # one statement: its own transaction
            await _insert_attempt(conn, account, destination, at, allowed, reason, caller)

    # -- the gate: one read and one write per decision -------------------------
    async def account_state(
        self, account: str, *, account_since: datetime | None = None,
        callee_since: datetime | None = None, destination: str | None = None,
        cps_since: datetime | None = None, caller: str | None = None,
        caller_hour_since: datetime | None = None, caller_day_since: datetime | None = None,
    ) -> AccountSnapshot:
        a_since = rules.check_time(account_since) if account_since else None
        c_since = rules.check_time(callee_since) if callee_since else None
        s_since = rules.check_time(cps_since) if cps_since else None
        h_since = rules.check_time(caller_hour_since) if caller_hour_since else None
        d_since = rules.check_time(caller_day_since) if caller_day_since else None
        # One round trip: the row, the live count and every attempt count together.
        row = await self._reads.submit(
            (account, a_since, c_since, destination, s_since, caller, h_since, d_since))
        live = int(row["live"])
        account_attempts = int(row["acc_n"])
        callee_attempts = int(row["callee_n"])
        extra = (int(row["cps_n"]), int(row["hour_n"]), int(row["day_n"]), row["suspended"])
        if row["posted"] is None:
            return AccountSnapshot(Decimal(0), False, live, account_attempts, callee_attempts,
                                   False, *extra)
        available = rules.from_units(row["posted"] - row["held"], self.unit)
        return AccountSnapshot(available, bool(row["closed"]), live, account_attempts,
                               callee_attempts, True, *extra)

    async def admit_and_hold(
        self, call: CallRecord, max_live: int | None, amount: Decimal, paid_seconds: int,
        *, reason: str, caller_key: str | None = None,
    ) -> Admission:
        admit = self._admit_job(call, max_live)
        caller = call.caller if caller_key is None else caller_key
        hold = self._hold_job(call.call_id, 1, amount, paid_seconds, call.admitted_at)
        units = rules.positive_units(amount, self.unit, what="hold")
        rate = rules.to_units(call.rate, self.unit, what="rate")
        admitted = rules.check_time(call.admitted_at)
        key = rules.hold_key(call.call_id, 1)

        if call.answered_at is None:
            quick = await self._admits.submit((
                call.call_id, call.account, call.node, call.caller, call.callee,
                call.tariff_name, rate, call.increment, call.minimum, admitted, units,
                paid_seconds, key, max_live, reason, caller,
            ))
            if quick != "careful":
                return _ADMISSIONS[quick]

        async def run(conn: Any) -> Admission:
            if not await admit(conn):
                await _insert_attempt(conn, call.account, call.callee, call.admitted_at,
                                      False, "concurrency_limit", caller)
                return Admission.LINES_BUSY
            if not await hold(conn):
                await conn.execute(
                    "DELETE FROM calls WHERE call_id = $1 AND held = 0 AND steps = 0",
                    call.call_id)
                await _insert_attempt(conn, call.account, call.callee, call.admitted_at,
                                      False, "insufficient_balance", caller)
                return Admission.NO_FUNDS
            await _insert_attempt(conn, call.account, call.callee, call.admitted_at, True,
                                  reason, caller)
            return Admission.ADMITTED

        return await self._run(run)

    async def attempts(
        self, account: str, since: datetime, destination: str | None = None
    ) -> list[datetime]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT at FROM attempts WHERE account = $1 AND at >= $2 AND allowed"
                " AND ($3::text IS NULL OR destination = $3) ORDER BY at",
                account, rules.check_time(since), destination,
            )
        return [r["at"] for r in rows]

    async def prune_attempts(self, before: datetime) -> int:
        async with self._tx() as conn:
            status = await conn.execute(
                "DELETE FROM attempts WHERE at < $1", rules.check_time(before)
            )
        return int(status.split()[-1])  # "DELETE <count>"

    # -- the lanes' statements: one request alone, or a batch of them ---------------
    async def _read_one(self, req: tuple[Any, ...]) -> Any:
        async with self._conn() as conn:
            return await conn.fetchrow(sql.STATE_ONE, *req)

    async def _read_many(self, reqs: Sequence[tuple[Any, ...]]) -> list[Any]:
        columns = [list(c) for c in zip(*reqs, strict=True)]
        return list(await self._batch(lambda conn: conn.fetch(sql.STATE_MANY, *columns)))

    async def _admit_one(self, req: tuple[Any, ...]) -> str:
        async with self._conn() as conn:
            return str(await conn.fetchval(sql.ADMIT_ONE, *req))

    async def _admit_many(self, reqs: Sequence[tuple[Any, ...]]) -> list[str]:
        columns = [list(c) for c in zip(*reqs, strict=True)]
        return list(await self._batch(lambda conn: conn.fetchval(sql.ADMIT_MANY, *columns)))

    async def _hold_one(self, req: tuple[Any, ...]) -> str:
        async with self._conn() as conn:
            return str(await conn.fetchval(sql.HOLD_ONE, *req))

    async def _hold_many(self, reqs: Sequence[tuple[Any, ...]]) -> list[str]:
        columns = [list(c) for c in zip(*reqs, strict=True)]
        return list(await self._batch(lambda conn: conn.fetchval(sql.HOLD_MANY, *columns)))

    async def _settle_one(self, req: tuple[Any, ...]) -> Any:
        async with self._conn() as conn:
            return await conn.fetchrow(sql.SETTLE_ONE, *req)

    async def _settle_many(self, reqs: Sequence[tuple[Any, ...]]) -> list[Any]:
        columns = [list(c) for c in zip(*reqs, strict=True)]
        rows = await self._batch(lambda conn: conn.fetch(sql.SETTLE_MANY, *columns))
        by_place = {row["n"]: row for row in rows}
        return [by_place.get(n) for n in range(1, len(reqs) + 1)]


    # -- consistency ----------------------------------------------------------
    async def audit(self) -> list[str]:
        # REPEATABLE READ: every query below sees the same snapshot.
        async with self._tx(isolation="repeatable_read") as conn:
            accounts = [
                rules.StoredAccount(r["id"], r["posted"], r["held"], r["closed"])
                for r in await conn.fetch("SELECT id, posted, held, closed FROM accounts")
            ]
            account_sums = {
                (r[0], r[1]): int(r[2])
                for r in await conn.fetch(
                    "SELECT account, kind, sum(amount) FROM postings GROUP BY account, kind"
                )
            }
            calls = [
                rules.StoredCall(r[0], r[1], r[2] == "ended", r[3], r[4], r[5] or 0)
                for r in await conn.fetch(
                    "SELECT c.call_id, c.account, c.status, c.held, d.amount, d.correction"
                    " FROM calls c LEFT JOIN cdrs d ON d.call_id = c.call_id"
                )
            ]
            call_sums = {
                (r[0], r[1]): int(r[2])
                for r in await conn.fetch(
                    "SELECT call_id, kind, sum(amount) FROM postings"
                    " WHERE call_id IS NOT NULL GROUP BY call_id, kind"
                )
            }
        return rules.audit(accounts, account_sums, calls, call_sums, self.unit)


async def _insert_attempt(conn: Any, account: str, destination: str, at: datetime,
                          allowed: bool, reason: str, caller: str = "") -> None:
    await conn.execute(
        "INSERT INTO attempts (account, destination, at, allowed, reason, caller)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        account, destination, rules.check_time(at), allowed, reason, caller,
    )
