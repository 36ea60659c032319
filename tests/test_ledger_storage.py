"""What the ledger keeps on disk: URLs, minor unit, schema migrations, locking, audit.

These reach under the Ledger API (raw sqlite3 / asyncpg) to set up old or
damaged stores, which is why they are per backend where they must be.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import asyncpg
import pytest

from agent.ledger import (
    Admission,
    CallRecord,
    Cdr,
    LedgerError,
    LedgerUnavailable,
    RefusedOperation,
    open_ledger,
)
from agent.ledger import _rules as rules
from agent.ledger import postgres as pg_backend
from agent.ledger import sqlite as sqlite_backend
from agent.ledger.sqlite import SqliteLedger

T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)


def call(call_id: str, account: str = "acme") -> CallRecord:
    return CallRecord(call_id, account, "pbx-1", "021", "138", "standard", D("0.13"), 60, 60, T0)


# -- URLs -------------------------------------------------------------------------------
async def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(LedgerError, match="unknown scheme 'mysql'"):
        await open_ledger("mysql://db/ledger")


async def test_sqlite_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = await open_ledger(f"sqlite://{tmp_path}/abs.db")
    await absolute.close()
    assert (tmp_path / "abs.db").exists()
    monkeypatch.chdir(tmp_path)
    relative = await open_ledger("sqlite:rel.db")
    await relative.close()
    assert (tmp_path / "rel.db").exists()
    with pytest.raises(LedgerError, match="no host"):
        await open_ledger("sqlite://host/x.db")
    with pytest.raises(LedgerError, match="unknown option"):
        await open_ledger(f"sqlite://{tmp_path}/x.db?journal=off")


async def test_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(LedgerUnavailable, match="does not exist"):
        await open_ledger(f"sqlite://{tmp_path}/missing/ledger.db")


async def test_an_unreachable_postgres_is_unavailable() -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    with pytest.raises(LedgerUnavailable, match="cannot reach"):
        await open_ledger("postgresql://root@127.0.0.1:1/test")


# -- the minor unit ----------------------------------------------------------------------
async def test_the_minor_unit_is_fixed_at_creation(ledger_url: str) -> None:
    joiner = "&" if "?" in ledger_url else "?"
    created = await open_ledger(f"{ledger_url}{joiner}minor_unit=0.01")
    try:
        await created.topup("acme", D("100.01"), ref="T1", at=T0)
        with pytest.raises(RefusedOperation, match=r"minor unit 0\.01"):
            await created.topup("acme", D("0.001"), ref="T2", at=T0)
    finally:
        await created.close()
    reopened = await open_ledger(ledger_url)  # no option: the stored unit still rules
    try:
        with pytest.raises(RefusedOperation, match="minor unit"):
            await reopened.penalty("acme", D("0.005"), ref="P1", at=T0)
        assert (await reopened.balance("acme")).posted == D("100.01")
    finally:
        await reopened.close()


async def test_bad_url_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="minor_unit"):
        await open_ledger(f"sqlite://{tmp_path}/x.db?minor_unit=0.05")
    with pytest.raises(LedgerError, match="pool_size"):
        await open_ledger("postgresql://root@127.0.0.1:1/test?pool_size=many")


# -- schema versions: SQLite ---------------------------------------------------------------
def _sqlite_store_at_version(path: Path, version: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?), ('minor_unit', '0.0001')",
                 (str(version),))
    for step in sqlite_backend.MIGRATIONS[:version]:
        for statement in step:
            conn.execute(statement)
    conn.close()


async def test_sqlite_an_older_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _sqlite_store_at_version(path, 1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO accounts (id, posted, created_at) VALUES ('acme', 1000000, 0)")
    conn.execute(
        "INSERT INTO postings (account, kind, amount, at, ref, key)"
        " VALUES ('acme', 'topup', 1000000, 0, 'T1', 'topup:T1')"
    )
    conn.close()
    ledger = await SqliteLedger.open(path)
    try:
        assert (await ledger.balance("acme")).posted == D("100")
        await ledger.record_attempt("acme", "138", T0, True, "")  # the v2 table exists
        assert await ledger.attempts("acme", T0) == [T0]
        assert await ledger.audit() == []
    finally:
        await ledger.close()
    version = sqlite3.connect(path).execute(
        "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert int(version) == rules.SCHEMA_VERSION


async def test_sqlite_a_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    _sqlite_store_at_version(path, rules.SCHEMA_VERSION)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(LedgerError, match=r"schema version 99, newer .* upgrade callgate"):
        await SqliteLedger.open(path)


async def test_sqlite_a_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)")
    with pytest.raises(LedgerError, match="not a callgate ledger"):
        await SqliteLedger.open(path)


# -- schema versions: PostgreSQL -------------------------------------------------------------
async def _pg_exec(url: str, *statements: str) -> None:
    dsn, _ = pg_backend.split_options(url)
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_postgres_an_older_store_is_migrated(pg_url: str) -> None:
    await _pg_exec(
        pg_url,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('schema_version', '1'), ('minor_unit', '0.0001')",
        *pg_backend.MIGRATIONS[0],
        "INSERT INTO accounts (id, posted, created_at) VALUES ('acme', 1000000, now())",
        "INSERT INTO postings (account, kind, amount, at, ref, key)"
        " VALUES ('acme', 'topup', 1000000, now(), 'T1', 'topup:T1')",
    )
    ledger = await open_ledger(pg_url)
    try:
        assert (await ledger.balance("acme")).posted == D("100")
        await ledger.record_attempt("acme", "138", T0, True, "")
        assert await ledger.attempts("acme", T0) == [T0]
        assert await ledger.audit() == []
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_postgres_a_version_7_store_gains_the_one_round_trip_functions(pg_url: str) -> None:
    """7 -> 8 adds the admission, hold and settlement functions (and 8 -> 9 their batch
    forms); a call live across the upgrade is held and settled by them."""
    # A version 7 store with an account of 10 and a live call holding 0.13.
    await _pg_exec(
        pg_url,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('schema_version', '7'), ('minor_unit', '0.0001')",
        *(statement for step in pg_backend.MIGRATIONS[:7] for statement in step),
        "INSERT INTO accounts (id, posted, held, created_at) VALUES ('acme', 100000, 1300, now())",
        "INSERT INTO postings (account, kind, amount, at, ref, key)"
        " VALUES ('acme', 'topup', 100000, now(), 'T1', 'topup:T1')",
        "INSERT INTO calls (call_id, account, node, caller, callee, tariff_name, rate,"
        " increment, minimum, admitted_at, status, held, paid_seconds, steps)"
        " VALUES ('c-old', 'acme', 'pbx-1', '021', '138', 'standard', 1300, 60, 60, now(),"
        " 'admitted', 1300, 60, 1)",
        "INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
        " VALUES ('acme', 'hold', 1300, now(), 'c-old', 'hold:c-old:1', 'c-old')",
    )
    ledger = await open_ledger(pg_url)
    await ledger.close()
    dsn, _ = pg_backend.split_options(pg_url)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'"
                                   ) == str(rules.SCHEMA_VERSION)
        functions = {r[0] for r in await conn.fetch(
            "SELECT proname FROM pg_proc WHERE pronamespace = current_schema()::regnamespace")}
        assert {"callgate_admit", "callgate_hold", "callgate_settle"} <= functions
    finally:
        await conn.close()
    ledger = await open_ledger(pg_url)
    try:
        assert await ledger.hold("c-old", 2, D("0.13"), 120, T0)
        assert await ledger.admit_and_hold(call("c-new"), 2, D("0.13"), 60,
                                           reason="ok") is Admission.ADMITTED
        assert await ledger.admit_and_hold(call("c-busy"), 2, D("0.13"), 60,
                                           reason="ok") is Admission.LINES_BUSY
        for call_id in ("c-old", "c-new"):
            settled = await ledger.settle_call(Cdr(call_id, "acme", "021", "138", None, T0,
                                                   0, 0, D(0), "NO_ANSWER"))
            assert settled.amount == 0
        assert (await ledger.balance("acme")).held == 0
        assert await ledger.audit() == []
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_postgres_a_version_8_store_gains_the_batch_functions(pg_url: str) -> None:
    """8 -> 9 adds the batch forms of admission, hold and settlement (group commit);
    calls live across the upgrade are held and settled in batches, and the audit holds."""
    await _pg_exec(
        pg_url,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('schema_version', '8'), ('minor_unit', '0.0001')",
        *(statement for step in pg_backend.MIGRATIONS[:8] for statement in step),
        "INSERT INTO accounts (id, posted, held, created_at)"
        " VALUES ('acme', 1000000, 26000, now())",
        "INSERT INTO postings (account, kind, amount, at, ref, key)"
        " VALUES ('acme', 'topup', 1000000, now(), 'T1', 'topup:T1')",
        *(f"INSERT INTO calls (call_id, account, node, caller, callee, tariff_name, rate,"
          f" increment, minimum, admitted_at, status, held, paid_seconds, steps)"
          f" VALUES ('old-{n}', 'acme', 'pbx-1', '021', '138', 'standard', 1300, 60, 60,"
          f" now(), 'admitted', 1300, 60, 1)" for n in range(20)),
        *(f"INSERT INTO postings (account, kind, amount, at, ref, key, call_id)"
          f" VALUES ('acme', 'hold', 1300, now(), 'old-{n}', 'hold:old-{n}:1', 'old-{n}')"
          for n in range(20)),
    )
    ledger = await open_ledger(pg_url)
    try:
        assert isinstance(ledger, pg_backend.PostgresLedger)
        dsn, _ = pg_backend.split_options(pg_url)
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'") == "9"
            functions = {r[0] for r in await conn.fetch(
                "SELECT proname FROM pg_proc WHERE pronamespace = current_schema()::regnamespace")}
            assert {"callgate_admit_batch", "callgate_hold_batch",
                    "callgate_settle_batch"} <= functions
        finally:
            await conn.close()
        held = await asyncio.gather(*(ledger.hold(f"old-{n}", 2, D("0.13"), 120, T0)
                                      for n in range(20)))
        assert all(held)
        assert ledger._holds.batches > 0
        settled = await asyncio.gather(*(
            ledger.settle_call(Cdr(f"old-{n}", "acme", "021", "138", None, T0, 0, 0, D(0),
                                   "NO_ANSWER")) for n in range(20)))
        assert [c.amount for c in settled] == [D(0)] * 20
        assert ledger._settles.batches > 0
        assert (await ledger.balance("acme")).held == 0
        assert await ledger.audit() == []
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_postgres_a_newer_store_is_refused(pg_url: str) -> None:
    ledger = await open_ledger(pg_url)
    await ledger.close()
    await _pg_exec(pg_url, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="schema version 99"):
        await open_ledger(pg_url)


@pytest.mark.postgres
async def test_postgres_agents_starting_together_create_the_schema_once(pg_url: str) -> None:
    opened = await asyncio.gather(*(open_ledger(pg_url) for _ in range(4)))
    try:
        await opened[0].topup("acme", D("1"), ref="T1", at=T0)
        assert (await opened[3].balance("acme")).posted == D("1")
    finally:
        for ledger in opened:
            await ledger.close()


# -- locking (SQLite) -----------------------------------------------------------------------
async def test_sqlite_a_store_locked_past_the_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path, busy_timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(LedgerUnavailable, match="locked"):
            await ledger.topup("acme", D("100"), ref="T1", at=T0)
        other.execute("ROLLBACK")
        await ledger.topup("acme", D("100"), ref="T1", at=T0)  # and it recovers
        assert (await ledger.balance("acme")).posted == D("100")
    finally:
        other.close()
        await ledger.close()


async def test_sqlite_daemon_and_cli_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    daemon, cli = await SqliteLedger.open(path), await SqliteLedger.open(path)
    try:
        await cli.topup("acme", D("100"), ref="T1", at=T0)
        assert await daemon.admit_call(call("c1"), None)
        assert await daemon.hold("c1", 0, D("0.13"), 60, T0)
        assert (await cli.balance("acme")).available == D("99.87")
    finally:
        await daemon.close()
        await cli.close()


async def test_a_closed_ledger_says_so(tmp_path: Path) -> None:
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    await ledger.close()
    with pytest.raises(LedgerUnavailable, match="closed"):
        await ledger.balances()


# -- group commit (SQLite) --------------------------------------------------------------------
async def test_sqlite_batched_writes_fail_and_succeed_alone(tmp_path: Path) -> None:
    """Writes issued together share a commit; one refusal must not undo its neighbours."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        await ledger.topup("acme", D("1.30"), ref="T1", at=T0)  # exactly 10 increments
        for n in range(20):
            await ledger.admit_call(call(f"c{n}"), None)
        results = await asyncio.gather(
            *(ledger.hold(f"c{n}", 0, D("0.13"), 60, T0) for n in range(20)),
            *(ledger.hold(f"ghost{n}", 0, D("0.13"), 60, T0) for n in range(5)),
            return_exceptions=True,
        )
        assert results[:20].count(True) == 10 and results[:20].count(False) == 10
        assert all(isinstance(r, RefusedOperation) for r in results[20:])
        assert (await ledger.balance("acme")).available == D(0)
        assert await ledger.audit() == []
    finally:
        await ledger.close()


async def test_sqlite_jobs_failing_after_they_wrote_undo_only_their_own_writes(
    tmp_path: Path,
) -> None:
    """In one group commit: each failing job's writes are undone, its neighbours' kept."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        await ledger.topup("acme", D("1"), ref="T0", at=T0)
        gate = threading.Event()
        # Hold the worker, so that everything below is queued and taken as one batch.
        blocker = asyncio.ensure_future(ledger._write(lambda conn: gate.wait(5)))
        await asyncio.sleep(0.05)

        def half_done(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE accounts SET posted = posted + 999 WHERE id = 'acme'")
            raise RefusedOperation("changed its mind after writing")

        topups = iter(ledger.topup("acme", D("1"), ref=f"T{n}", at=T0) for n in range(1, 8))
        jobs = [next(topups), next(topups), ledger._write(half_done), next(topups),
                ledger._write(half_done), next(topups), next(topups), next(topups),
                next(topups), ledger._write(half_done)]
        pending = asyncio.gather(*jobs, return_exceptions=True)
        await asyncio.sleep(0.05)  # all ten queued behind the blocker
        gate.set()
        await blocker
        results = await pending
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert failed == [2, 4, 9]
        assert all(isinstance(results[i], RefusedOperation) for i in failed)
        assert (await ledger.balance("acme")).available == D("8")
        assert len(await ledger.history("acme")) == 8
        assert await ledger.audit() == []
    finally:
        await ledger.close()


async def test_sqlite_an_admission_whose_caller_gave_up_before_it_began_is_not_run(
    tmp_path: Path,
) -> None:
    """Overload: a gate whose budget ran out must not leave its admission queued, to
    run later for nobody and delay every fresh request behind it. Any other write
    (a top-up here; a settlement cancelled at shutdown) still runs."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        await ledger.topup("acme", D("1"), ref="T0", at=T0)
        started, gate = threading.Event(), threading.Event()

        def block(conn: sqlite3.Connection) -> None:
            started.set()
            gate.wait(10)

        blocker = asyncio.ensure_future(ledger._write(block))
        assert await asyncio.to_thread(started.wait, 10)  # the worker is inside it
        with pytest.raises(TimeoutError):  # queued behind the blocker, then abandoned
            async with asyncio.timeout(0.05):
                await ledger.admit_and_hold(call("late"), None, D("0.13"), 60,
                                            reason="allowed")
        with pytest.raises(TimeoutError):  # abandoned too, but not abandonable
            async with asyncio.timeout(0.05):
                await ledger.topup("acme", D("1"), ref="T1", at=T0)
        gate.set()
        await blocker
        await ledger.topup("acme", D("1"), ref="T2", at=T0)  # behind both: they are done
        assert await ledger.get_call("late") is None  # never admitted, nothing held
        balance = await ledger.balance("acme")
        assert balance.available == D("3") and balance.held == 0  # T0, T1 and T2
        assert await ledger.audit() == []
    finally:
        await ledger.close()


# -- audit finds damage ------------------------------------------------------------------------
async def test_audit_reports_a_tampered_balance(ledger_url: str) -> None:
    ledger = await open_ledger(ledger_url)
    try:
        await ledger.topup("acme", D("100"), ref="T1", at=T0)
        await ledger.admit_call(call("c1"), None)
        await ledger.hold("c1", 0, D("0.13"), 60, T0)
        assert await ledger.audit() == []
        tamper = (
            "UPDATE accounts SET posted = posted + 10000",
            "UPDATE calls SET held = 0",
        )
        if ledger_url.startswith("sqlite"):
            conn = sqlite3.connect(ledger_url.removeprefix("sqlite://"), isolation_level=None)
            for statement in tamper:
                conn.execute(statement)
            conn.close()
        else:
            await _pg_exec(ledger_url, *tamper)
        problems = await ledger.audit()
        assert any("'acme': posted balance 101.00 but its postings sum to 100.00" in p
                   for p in problems), problems
        assert any("call 'c1': held 0.00" in p for p in problems), problems
    finally:
        await ledger.close()


def test_audit_rules_catch_each_kind_of_damage() -> None:
    unit = D("0.0001")
    accounts = [rules.StoredAccount("a", 100, 0, True), rules.StoredAccount("b", 0, -5, False)]
    sums = {("a", "topup"): 100, ("ghost", "topup"): 1, ("b", "hold"): 5, ("b", "release"): 10}
    calls = [rules.StoredCall("c1", "b", True, 5, None), rules.StoredCall("c2", "b", True, 0, 7)]
    call_sums = {("c1", "hold"): 5, ("c2", "hold"): 7, ("c2", "charge"): 6, ("c2", "release"): 1}
    problems = rules.audit(accounts, sums, calls, call_sums, unit)
    joined = "\n".join(problems)
    for expected in (
        "'a': closed without a refund posting",
        "'b': negative held amount",
        "account 'ghost', which does not exist",
        "'c1': ended with a hold still open",
        "'c1': ended without a CDR",
        "'c2': CDR amount 0.0007 but charged 0.0006",
    ):
        assert expected in joined, joined


def test_settle_plan_never_charges_more_than_was_held() -> None:
    assert rules.settle_plan(26, 13) == rules.Settlement(charge=13, release=13, capped=False)
    assert rules.settle_plan(13, 39) == rules.Settlement(charge=13, release=0, capped=True)
    assert rules.settle_plan(0, 0) == rules.Settlement(charge=0, release=0, capped=False)
    with pytest.raises(RefusedOperation):
        rules.settle_plan(13, -1)


def test_storage_times_round_trip_to_the_microsecond() -> None:
    moment = datetime(2026, 11, 25, 0, 0, 0, 999999, tzinfo=UTC)
    assert rules.from_micros(rules.to_micros(moment)) == moment
    with pytest.raises(ValueError, match="timezone-aware"):
        rules.to_micros(datetime(2026, 1, 1))


@pytest.mark.postgres
async def test_postgres_a_lost_connection_is_unavailable_then_recovers(pg_url: str) -> None:
    # A name of our own, so only this ledger's session is terminated on the shared server.
    name = f"callgate-test-{id(pg_url)}"
    ledger = await open_ledger(f"{pg_url}&application_name={name}&pool_size=1")
    dsn, _ = pg_backend.split_options(pg_url)
    blocker = await asyncpg.connect(dsn)
    try:
        await ledger.topup("acme", D("100"), ref="T1", at=T0)
        # Hold the account row so the next top-up is certainly mid-transaction
        # when its session is killed.
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT * FROM accounts WHERE id = 'acme' FOR UPDATE")
        pending = asyncio.ensure_future(ledger.topup("acme", D("1"), ref="T2", at=T0))
        for _ in range(200):
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND wait_event_type = 'Lock'", name)
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the ledger's top-up never waited on the row lock"
        await blocker.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = $1", name)
        with pytest.raises(LedgerUnavailable, match="lost the PostgreSQL ledger"):
            await pending
        await blocker.execute("ROLLBACK")
        # The pool replaces the dead connection; the refused write can be retried.
        await ledger.topup("acme", D("1"), ref="T2", at=T0)
        assert (await ledger.balance("acme")).posted == D("101")
    finally:
        await blocker.close()
        await ledger.close()


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception),
                                             ("", pytest.skip.Exception)])
def test_an_unreachable_test_server_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    from tests import conftest

    monkeypatch.setattr(conftest, "_pg_base", [None, "connection refused"])
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="not reachable"):
        conftest.pg_base_url()
